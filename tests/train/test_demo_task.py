"""The demo task: deterministic, disjoint splits, correct spellings, strict scoring, and a base model that fails it."""

import datetime as dt
import re
import time
from collections import Counter

import pytest

from lorakit.models import load_model, load_tokenizer
from lorakit.train.data import build_dataset, load_examples
from lorakit.train.demo_task import (
    FIRST_YEAR,
    FORMS,
    HELDOUT_FORMS,
    LAST_YEAR,
    MAX_NEW_TOKENS,
    SYSTEM_PROMPT,
    TRAIN_FORMS,
    TWO_DIGIT_FORMS,
    heldout_years,
    make_example,
    make_examples,
    make_splits,
    score,
    spell,
    two_digit_year,
    write_jsonl,
)
from lorakit.train.evaluate import exact_match_accuracy

# How each spelling reads back with strptime (the "(US)"/"(EU)" labels, "the " and ordinal suffixes removed).
# Python's strptime %y is the POSIX rule the task states (69-99 -> 19xx, 00-68 -> 20xx), so it checks that rule too.
PARSE_FORMATS = {
    "ord_of_month_yy": "%d of %B '%y", "month_ord_yyyy": "%B %d, %Y", "us_yy": "%m/%d/%y (US)",
    "eu_dots": "%d.%m.%Y (EU)", "yyyy_mon_d": "%Y %b %d", "d_mon_yy": "%d-%b-%y", "weekday": "%a, %d %b %Y",
    "mon_ord_yy": "%b. %d '%y", "d_month_yyyy": "%d %B %Y", "us_yyyy": "%m/%d/%Y (US)",
    "eu_slashes": "%d/%m/%Y (EU)", "month_d_yyyy": "%B %d, %Y", "yyyy_slashes": "%Y/%m/%d",
    "the_ord_of_month_yyyy": "the %d of %B, %Y", "mon_d_yyyy": "%b %d %Y",
}


def user_text(example):
    return example["messages"][1]["content"].removeprefix("Date: ")


def answer(example):
    return example["messages"][2]["content"]


def test_spellings_of_a_known_date():
    texts = {form: spell(dt.date(2021, 3, 3), form) for form in FORMS}
    assert texts == {
        "ord_of_month_yy": "3rd of March '21", "month_ord_yyyy": "March 3rd, 2021", "us_yy": "03/03/21 (US)",
        "eu_dots": "03.03.2021 (EU)", "yyyy_mon_d": "2021 Mar 3", "d_mon_yy": "3-Mar-21",
        "weekday": "Wed, 3 Mar 2021", "mon_ord_yy": "Mar. 3rd '21", "d_month_yyyy": "3 March 2021",
        "us_yyyy": "03/03/2021 (US)", "eu_slashes": "03/03/2021 (EU)", "month_d_yyyy": "March 3, 2021",
        "yyyy_slashes": "2021/03/03", "the_ord_of_month_yyyy": "the 3rd of March, 2021", "mon_d_yyyy": "Mar 3 2021"}
    assert set(PARSE_FORMATS) == set(FORMS)
    example = make_example(dt.date(1999, 7, 4), "the_ord_of_month_yyyy")
    assert example["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                   {"role": "user", "content": "Date: the 4th of July, 1999"},
                                   {"role": "assistant", "content": "1999-07-04"}]


def test_two_digit_years_follow_the_stated_rule_and_exist_only_where_it_reads_back():
    assert [two_digit_year(yy) for yy in (0, 21, 68, 69, 85, 99)] == [2000, 2021, 2068, 1969, 1985, 1999]
    assert spell(dt.date(1985, 12, 25), "d_mon_yy") == "25-Dec-85"
    for year in (1968, 1900, 2069, 2099):
        with pytest.raises(ValueError, match="no two-digit spelling"):
            spell(dt.date(year, 1, 1), "us_yy")
    assert spell(dt.date(1900, 1, 1), "eu_dots") == "01.01.1900 (EU)"


def parse(example):
    """(the form whose strptime format reads the input, the date it reads as); exactly one date must come back."""
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", user_text(example))
    matches = {}
    for form, fmt in PARSE_FORMATS.items():
        try:
            matches[form] = dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    assert len(set(matches.values())) == 1, (text, matches)
    return matches


def test_every_input_reads_back_as_its_answer():
    train, in_dist, ood = make_splits(600, 100, seed=5)
    for example in train + in_dist + ood:
        assert set(parse(example).values()) == {dt.date.fromisoformat(answer(example))}, user_text(example)


def test_generator_is_deterministic_for_a_seed():
    assert make_examples(50, seed=1) == make_examples(50, seed=1)
    assert make_examples(50, seed=1) != make_examples(50, seed=2)
    assert make_splits(300, 100, seed=4) == make_splits(300, 100, seed=4)


def test_splits_cover_1900_to_2099_and_keep_heldout_years_and_forms_apart():
    train, in_dist, ood = make_splits(2400, 200, seed=0)
    assert (len(train), len(in_dist), len(ood)) == (2400, 200, 200)
    held = heldout_years(0)
    assert len(held) == 20 and all(FIRST_YEAR <= y <= LAST_YEAR for y in held)
    answers = [answer(e) for e in train + in_dist + ood]
    assert len(set(answers)) == len(answers)  # every example a distinct date, so no held-out input was trained on
    train_years = Counter(int(answer(e)[:4]) for e in train)
    assert min(train_years) < 1910 and max(train_years) > 2090 and not held & set(train_years)
    assert sum(y < 2000 for y in train_years.elements()) > 900  # half the years are 19xx
    forms_of = lambda examples: {form for e in examples for form in parse(e)}  # noqa: E731
    assert forms_of(train) == set(TRAIN_FORMS)  # every training spelling is used, no held-out one
    assert not {int(answer(e)[:4]) for e in in_dist} & held
    assert not forms_of(in_dist) & set(HELDOUT_FORMS)
    for example in ood:  # each out-of-distribution example has a held-out year, a held-out form, or both
        assert int(answer(example)[:4]) in held or set(parse(example)) & set(HELDOUT_FORMS), user_text(example)
    assert forms_of(ood) >= set(HELDOUT_FORMS)
    for example in train:  # two-digit spellings only where the %y rule reads them back
        if set(parse(example)) & set(TWO_DIGIT_FORMS):
            assert 1969 <= int(answer(example)[:4]) <= 2068


def test_score_is_strict_exact_match():
    assert score(" 2021-03-03\n", "2021-03-03")
    for wrong in ("2021-3-3", "2021-03-03.", "The date is 2021-03-03", "2021-03-04", "", "2021/03/03"):
        assert not score(wrong, "2021-03-03"), wrong


def test_jsonl_round_trip_and_short_sequences(tmp_path):
    train = make_examples(64, seed=2)
    path = write_jsonl(train, tmp_path / "demo" / "train.jsonl")
    assert load_examples(path) == train
    items, _, stats = build_dataset(path, load_tokenizer(), max_seq_len=96)
    assert stats["truncated"] == 0 and max(len(i["input_ids"]) for i in items) <= 96  # the demo runs at 96
    assert all(sum(label != -100 for label in i["labels"]) == MAX_NEW_TOKENS for i in items)  # answer + end + \n


@pytest.mark.slow
def test_base_model_cannot_do_the_task():
    model, tok = load_model()
    _, heldout, _ = make_splits(2400, 128, seed=0, n_ood=0)
    start = time.perf_counter()
    accuracy, predictions = exact_match_accuracy(model, tok, heldout, batch_size=16, max_new_tokens=MAX_NEW_TOKENS,
                                                 score=score)
    print(f"base exact match {accuracy:.3f} on {len(heldout)} held-out in {time.perf_counter() - start:.1f} s")
    assert accuracy <= 0.3
    assert len(predictions) == 128 and sum(bool(p.strip()) for p in predictions) > 100  # it answers, wrongly
