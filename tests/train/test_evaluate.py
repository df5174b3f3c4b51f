"""Batched greedy generation (left padding must not change answers) and exact-match accuracy."""

import pytest
from helpers import tiny_llama, tiny_tokenizer

from lorakit.models import load_model
from lorakit.train.demo_task import MAX_NEW_TOKENS, make_splits
from lorakit.train.evaluate import exact_match, exact_match_accuracy, generate_batch

PROMPTS = ["hello", "what is 1 + 2 ?", "hi there", "what is the 3 + 4 + 1 ? 2 3", "system user"]


@pytest.fixture
def tiny():
    tok = tiny_tokenizer()
    tok.padding_side = "right"  # generate_batch must switch to left padding itself, then restore this
    return tiny_llama(vocab=len(tok)), tok


def test_batched_generation_matches_one_by_one(tiny):
    model, tok = tiny
    batched = generate_batch(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    single = [generate_batch(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(text for text in batched)
    assert tok.padding_side == "right" and not model.training


def test_generation_restores_training_mode(tiny):
    model, tok = tiny
    model.train()
    generate_batch(model, tok, PROMPTS[:2], max_new_tokens=2)
    assert model.training


def test_exact_match_accuracy_counts_hits(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    with pytest.warns(UserWarning, match="no chat template"):  # the tiny tokenizer uses the fallback template
        predictions = generate_batch(model, tok, prompts, max_new_tokens=4)
    answers = list(predictions)
    answers[1] = answers[3] = "certainly wrong"
    examples = [{"messages": m + [{"role": "assistant", "content": a}]} for m, a in zip(prompts, answers)]
    accuracy, predicted = exact_match_accuracy(model, tok, examples, batch_size=2, max_new_tokens=4)
    assert predicted == predictions and accuracy == pytest.approx(3 / 5)
    assert exact_match_accuracy(model, tok, []) == (0.0, [])


def test_exact_match_strips_only_surrounding_whitespace():
    assert exact_match("  42\n", "42") and not exact_match("4 2", "42") and not exact_match("42.", "42")


@pytest.mark.slow
def test_real_model_batched_equals_one_by_one():
    model, tok = load_model()
    _, heldout, _ = make_splits(0, 6, seed=11, n_ood=0)
    prompts = [e["messages"][:-1] for e in heldout]
    batched = generate_batch(model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=6)
    single = [generate_batch(model, tok, [p], max_new_tokens=MAX_NEW_TOKENS)[0] for p in prompts]
    assert batched == single and all(text.strip() for text in batched)
