"""The demo task: deterministic, disjoint splits, correct spellings, strict scoring, and a base model that fails it."""

import datetime as dt
import re
import time

import pytest

from lorakit.evaluate import exact_match_accuracy
from lorakit.models import load_model, load_tokenizer
from lorakit.train.data import build_dataset, load_examples
from lorakit.train.demo_task import (
    MAX_NEW_TOKENS,
    SYSTEM_PROMPT,
    make_example,
    make_examples,
    make_splits,
    score,
    write_jsonl,
)

# How each spelling reads back with strptime (the "(US)"/"(EU)" labels and ordinal suffixes removed).
PARSE_FORMATS = ["%d of %B '%y", "%B %d, %Y", "%m/%d/%y", "%d.%m.%Y", "%Y %b %d", "%d-%b-%y", "%a, %d %b %Y",
                 "%b. %d '%y"]


def user_text(example):
    return example["messages"][1]["content"].removeprefix("Date: ")


def answer(example):
    return example["messages"][2]["content"]


def test_spellings_of_a_known_date():
    texts = [user_text(make_example(dt.date(2021, 3, 3), form)) for form in range(8)]
    assert texts == ["3rd of March '21", "March 3rd, 2021", "03/03/21 (US)", "03.03.2021 (EU)", "2021 Mar 3",
                     "3-Mar-21", "Wed, 3 Mar 2021", "Mar. 3rd '21"]
    example = make_example(dt.date(2012, 11, 22), 0)
    assert example["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                   {"role": "user", "content": "Date: 22nd of November '12"},
                                   {"role": "assistant", "content": "2012-11-22"}]


def spelling(example):
    """(index of the one PARSE_FORMATS entry the input matches, the date it reads as)."""
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", user_text(example)).replace(" (US)", "").replace(" (EU)", "")
    matches = []
    for index, fmt in enumerate(PARSE_FORMATS):
        try:
            matches.append((index, dt.datetime.strptime(text, fmt).date()))
        except ValueError:
            continue
    assert len(matches) == 1, (text, matches)
    return matches[0]


def test_every_input_reads_back_as_its_answer():
    for example in make_examples(400, seed=5):
        assert spelling(example)[1] == dt.date.fromisoformat(answer(example)), user_text(example)


def test_generator_is_deterministic_for_a_seed():
    assert make_examples(50, seed=1) == make_examples(50, seed=1)
    assert make_examples(50, seed=1) != make_examples(50, seed=2)
    assert make_splits(300, 100, seed=4) == make_splits(300, 100, seed=4)


def test_train_and_heldout_are_disjoint_and_varied():
    train, heldout = make_splits(2400, 200, seed=0)
    assert (len(train), len(heldout)) == (2400, 200)
    assert not {answer(e) for e in train} & {answer(e) for e in heldout}
    assert not {user_text(e) for e in train} & {user_text(e) for e in heldout}
    assert len({answer(e) for e in train + heldout}) == 2600
    assert {spelling(e)[0] for e in heldout} == set(range(len(PARSE_FORMATS)))  # every spelling is tested


def test_score_is_strict_exact_match():
    assert score(" 2021-03-03\n", "2021-03-03")
    for wrong in ("2021-3-3", "2021-03-03.", "The date is 2021-03-03", "2021-03-04", "", "2021/03/03"):
        assert not score(wrong, "2021-03-03"), wrong


def test_jsonl_round_trip_and_short_sequences(tmp_path):
    train, _ = make_splits(64, 0, seed=2)
    path = write_jsonl(train, tmp_path / "demo" / "train.jsonl")
    assert load_examples(path) == train
    items, _, stats = build_dataset(path, load_tokenizer(), max_seq_len=96)
    assert stats["truncated"] == 0 and max(len(i["input_ids"]) for i in items) <= 96  # the demo runs at 96
    assert all(sum(label != -100 for label in i["labels"]) == MAX_NEW_TOKENS for i in items)  # answer + end + \n


@pytest.mark.slow
def test_base_model_cannot_do_the_task():
    model, tok = load_model()
    _, heldout = make_splits(2400, 128, seed=0)
    start = time.perf_counter()
    accuracy, predictions = exact_match_accuracy(model, tok, heldout, batch_size=16, max_new_tokens=MAX_NEW_TOKENS,
                                                 score=score)
    print(f"base exact match {accuracy:.3f} on {len(heldout)} held-out in {time.perf_counter() - start:.1f} s")
    assert accuracy <= 0.3
    assert len(predictions) == 128 and sum(bool(p.strip()) for p in predictions) > 100  # it answers, wrongly
