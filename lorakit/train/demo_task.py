"""The demo task: normalise free-form dates ("3rd of Mar '21", "03/03/21 (US)") to ISO ``2021-03-03``.

Why this task: the answer is short and exact (10 characters), so exact match is a fair metric;
SmolLM2-135M-Instruct gets it mostly wrong out of the box (the day/month order of the numeric forms,
two-digit years and ordinals trip it), yet the mapping is a small deterministic rule set that a LoRA
learns in ~100 steps. Examples come from a seeded ``random.Random``; every example has a distinct
underlying date, so the held-out set shares no date (and so no input) with the training set.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterable
from pathlib import Path

from lorakit.evaluate import exact_match

SYSTEM_PROMPT = "You convert dates to ISO 8601. Reply with the date only, as YYYY-MM-DD."
# SmolLM2's tokenizer splits digits: "2021-03-03" is 10 tokens, plus <|im_end|>; one spare.
MAX_NEW_TOKENS = 12
FIRST_DAY = dt.date(2000, 1, 1)  # two-digit years are unambiguous when every year is 20xx
LAST_DAY = dt.date(2039, 12, 31)
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _ordinal(day: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _forms(date: dt.date) -> list[str]:
    """The free-form spellings of ``date`` the task draws from (US and EU numeric forms are labelled)."""
    d, m, y, yy = date.day, date.month, date.year, date.year % 100
    month, mon = MONTHS[m - 1], MONTHS[m - 1][:3]
    weekday = date.strftime("%a")  # English abbreviations under the C locale that Python starts with
    return [
        f"{_ordinal(d)} of {month} '{yy:02d}",
        f"{month} {_ordinal(d)}, {y}",
        f"{m:02d}/{d:02d}/{yy:02d} (US)",
        f"{d:02d}.{m:02d}.{y} (EU)",
        f"{y} {mon} {d}",
        f"{d}-{mon}-{yy:02d}",
        f"{weekday}, {d} {mon} {y}",
        f"{mon}. {_ordinal(d)} '{yy:02d}",
    ]


def make_example(date: dt.date, form: int) -> dict:
    """One chat example asking to normalise spelling number ``form`` of ``date``."""
    text = _forms(date)[form]
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Date: {text}"},
        {"role": "assistant", "content": date.isoformat()},
    ]}


def _distinct_dates(rng: random.Random, n: int) -> list[dt.date]:
    """``n`` distinct dates drawn uniformly from [FIRST_DAY, LAST_DAY]."""
    span = (LAST_DAY - FIRST_DAY).days + 1
    if n > span:
        raise ValueError(f"asked for {n} distinct dates, the range holds only {span}")
    return [FIRST_DAY + dt.timedelta(days=k) for k in rng.sample(range(span), n)]


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat examples with distinct dates and a random spelling each; same seed, same list."""
    rng = random.Random(seed)
    n_forms = len(_forms(FIRST_DAY))
    return [make_example(date, rng.randrange(n_forms)) for date in _distinct_dates(rng, n)]


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) example lists whose dates, and so inputs, never overlap."""
    examples = make_examples(n_train + n_heldout, seed)
    return examples[:n_train], examples[n_train:]


def score(prediction: str, answer: str) -> bool:
    """Strict exact match after stripping surrounding whitespace (no partial credit, no reformatting)."""
    return exact_match(prediction, answer)


def write_jsonl(examples: Iterable[dict], path: str | Path) -> Path:
    """Write examples one JSON object per line (the chat format ``lorakit.train.data`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for example in examples:
            fh.write(json.dumps(example, ensure_ascii=False) + "\n")
    return path
