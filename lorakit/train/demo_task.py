"""The demo task: normalise free-form dates ("3rd of Mar '21", "03/03/21 (US)") to ISO ``2021-03-03``.

Why this task: the answer is short and exact (10 characters), so exact match is a fair metric;
SmolLM2-135M-Instruct gets it mostly wrong out of the box (the day/month order of the numeric forms,
two-digit years and ordinals trip it), yet the mapping is a small deterministic rule set that a LoRA
learns within the demo's short run.

Dates span 1900-2099, the years people write. A two-digit year follows the POSIX ``strptime %y`` rule:
00-68 mean 2000-2068 and 69-99 mean 1969-1999, so the two-digit spellings are drawn only for dates in
1969-2068, where that rule gives back the right century; other dates use four-digit spellings.

Held out from training, to measure what the adapter learned rather than what it saw: a seeded set of
whole years (no training date falls in them) and two whole spellings ("the 4th of July, 1999",
"Dec 25 1985", the forms users type first). The out-of-distribution slice of the held-out set uses a
held-out year, a held-out spelling, or both; the in-distribution slice uses neither. Every example has
a distinct underlying date, so no held-out date (and so no input) is a training one.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from lorakit.train.evaluate import exact_match

SYSTEM_PROMPT = "You convert dates to ISO 8601. Reply with the date only, as YYYY-MM-DD."
# SmolLM2's tokenizer splits digits: "2021-03-03" is 10 tokens, plus <|im_end|>; one spare.
MAX_NEW_TOKENS = 12
FIRST_YEAR, LAST_YEAR = 1900, 2099
TWO_DIGIT_PIVOT = 69  # strptime %y: 69-99 -> 19xx, 00-68 -> 20xx
TWO_DIGIT_YEARS = (1900 + TWO_DIGIT_PIVOT, 2000 + TWO_DIGIT_PIVOT - 1)  # where a two-digit year is unambiguous
HELDOUT_YEAR_COUNT = 20  # of the 200 years, seeded; 1 in 10
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _ordinal(day: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def two_digit_year(yy: int) -> int:
    """The year a two-digit year means under the task's (POSIX %y) rule."""
    return 1900 + yy if yy >= TWO_DIGIT_PIVOT else 2000 + yy


def _spell(date: dt.date) -> dict[str, str]:
    d, m, y, yy = date.day, date.month, date.year, date.year % 100
    month, mon = MONTHS[m - 1], MONTHS[m - 1][:3]
    weekday = date.strftime("%a")  # English abbreviations under the C locale that Python starts with
    return {
        "ord_of_month_yy": f"{_ordinal(d)} of {month} '{yy:02d}",
        "month_ord_yyyy": f"{month} {_ordinal(d)}, {y}",
        "us_yy": f"{m:02d}/{d:02d}/{yy:02d} (US)",
        "eu_dots": f"{d:02d}.{m:02d}.{y} (EU)",
        "yyyy_mon_d": f"{y} {mon} {d}",
        "d_mon_yy": f"{d}-{mon}-{yy:02d}",
        "weekday": f"{weekday}, {d} {mon} {y}",
        "mon_ord_yy": f"{mon}. {_ordinal(d)} '{yy:02d}",
        "d_month_yyyy": f"{d} {month} {y}",
        "us_yyyy": f"{m:02d}/{d:02d}/{y} (US)",
        "eu_slashes": f"{d:02d}/{m:02d}/{y} (EU)",
        "month_d_yyyy": f"{month} {d}, {y}",
        "yyyy_slashes": f"{y}/{m:02d}/{d:02d}",
        # held out (HELDOUT_FORMS)
        "the_ord_of_month_yyyy": f"the {_ordinal(d)} of {month}, {y}",
        "mon_d_yyyy": f"{mon} {d} {y}",
    }


FORMS = tuple(_spell(dt.date(2000, 1, 1)))
TWO_DIGIT_FORMS = ("ord_of_month_yy", "us_yy", "d_mon_yy", "mon_ord_yy")
HELDOUT_FORMS = ("the_ord_of_month_yyyy", "mon_d_yyyy")
TRAIN_FORMS = tuple(form for form in FORMS if form not in HELDOUT_FORMS)


def spell(date: dt.date, form: str) -> str:
    """The spelling `form` (a FORMS name) of `date`; two-digit forms only for dates the pivot rule reads back."""
    if form in TWO_DIGIT_FORMS and not TWO_DIGIT_YEARS[0] <= date.year <= TWO_DIGIT_YEARS[1]:
        raise ValueError(f"{date} has no two-digit spelling under the %y rule ({form})")
    return _spell(date)[form]


def make_example(date: dt.date, form: str) -> dict:
    """One chat example asking to normalise spelling `form` of `date`."""
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Date: {spell(date, form)}"},
        {"role": "assistant", "content": date.isoformat()},
    ]}


def heldout_years(seed: int = 0) -> frozenset[int]:
    """The years no training date falls in (seeded)."""
    rng = random.Random(f"heldout-years-{seed}")
    return frozenset(rng.sample(range(FIRST_YEAR, LAST_YEAR + 1), HELDOUT_YEAR_COUNT))


def _draw(rng: random.Random, n: int, years: list[int], used: set[dt.date],
          forms: Callable[[dt.date], tuple[str, ...]]) -> list[dict]:
    """`n` examples on distinct dates (none in `used`) of `years`, each in a random spelling from `forms`."""
    examples = []
    while len(examples) < n:
        year = rng.choice(years)
        date = dt.date(year, 1, 1) + dt.timedelta(days=rng.randrange(366 if calendar.isleap(year) else 365))
        if date in used:
            continue
        used.add(date)
        examples.append(make_example(date, rng.choice(forms(date))))
    return examples


def _fits(date: dt.date, forms: Iterable[str]) -> tuple[str, ...]:
    """The forms of `forms` that can spell `date`."""
    two_digit_ok = TWO_DIGIT_YEARS[0] <= date.year <= TWO_DIGIT_YEARS[1]
    return tuple(form for form in forms if two_digit_ok or form not in TWO_DIGIT_FORMS)


def make_splits(n_train: int, n_heldout: int, seed: int = 0,
                n_ood: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out in-distribution, held-out out-of-distribution); same seed, same lists.

    Train and the in-distribution slice use training years and spellings; each out-of-distribution
    example uses a held-out year, a held-out spelling, or both (a third each). `n_ood` defaults to n_heldout.
    """
    n_ood = n_heldout if n_ood is None else n_ood
    rng = random.Random(seed)
    held_years = heldout_years(seed)
    train_years = [y for y in range(FIRST_YEAR, LAST_YEAR + 1) if y not in held_years]
    used: set[dt.date] = set()
    train = _draw(rng, n_train, train_years, used, lambda date: _fits(date, TRAIN_FORMS))
    in_dist = _draw(rng, n_heldout, train_years, used, lambda date: _fits(date, TRAIN_FORMS))
    kinds = [k % 3 for k in range(n_ood)]  # 0: held-out year, 1: held-out form, 2: both
    ood = []
    for kind in kinds:
        years = sorted(held_years) if kind in (0, 2) else train_years
        forms = TRAIN_FORMS if kind == 0 else HELDOUT_FORMS
        ood += _draw(rng, 1, years, used, lambda date, forms=forms: _fits(date, forms))
    return train, in_dist, ood


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """`n` training examples (training years and spellings, distinct dates); same seed, same list."""
    return make_splits(n, 0, seed, n_ood=0)[0]


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
