"""Training data: JSONL formats and their errors, completion-only labels, truncation, packing, batching."""

import json

import pytest
import torch
from helpers import tiny_tokenizer

from lorakit.errors import LorakitError
from lorakit.models import load_tokenizer
from lorakit.train.data import (
    IGNORE_INDEX,
    batch_order,
    batches,
    build_dataset,
    collate,
    load_examples,
    pack,
    tokenize_example,
)

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}]}
TWO_TURNS = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


@pytest.fixture(scope="module")
def smol_tok():
    """The real SmolLM2 tokenizer (read from the GGUF or the conversion cache; no model load)."""
    return load_tokenizer("smollm2-135m-instruct")


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def trained_text(tok, item):
    return tok.decode([t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------- reading

def test_reads_chat_alpaca_and_text_formats(tmp_path):
    chat = load_examples(write_lines(tmp_path / "c.jsonl", [CHAT, "", TWO_TURNS]))
    assert chat == [CHAT, TWO_TURNS]
    alpaca = load_examples(write_lines(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Say hi", "output": "hi"}]))
    assert alpaca == [
        {"messages": [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    ]
    assert load_examples(write_lines(tmp_path / "t.jsonl", [{"text": "abc"}])) == [{"text": "abc"}]


@pytest.mark.parametrize("lines, message", [
    ([CHAT, '{"messages": [}'], ":2: invalid JSON"),
    ([{"messages": "hello"}], ':1: "messages" must be a list of {"role","content"} objects, got str'),
    ([CHAT, {"messages": [{"role": "bot", "content": "x"}]}], ':2: messages[0].role must be one of system, '
                                                              'user, assistant, got "bot"'),
    ([{"messages": [{"role": "user", "content": 3}]}], ":1: messages[0].content must be a string, got int"),
    ([{"messages": [{"role": "user", "content": "x"}]}], ":1: no assistant message"),
    ([{"instruction": "x"}], ':1: Alpaca record is missing "output"'),
    ([{"instruction": "x", "output": 5}], ':1: "output" must be a string, got int'),
    ([{"text": "a"}, CHAT], ":2: chat record, but the first record"),
    ([{"prompt": "a"}], ":1: unknown record with keys ['prompt']"),
    ([[1, 2]], ":1: each example must be a JSON object, got list"),
])
def test_bad_lines_name_file_line_and_problem(tmp_path, lines, message):
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(LorakitError) as info:
        load_examples(path)
    assert f"{path}{message}" in str(info.value)


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(LorakitError, match="no examples"):
        load_examples(empty)
    with pytest.raises(LorakitError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------- tokenizing

def test_chat_labels_cover_only_the_assistant_answer(smol_tok):
    item = tokenize_example(CHAT, smol_tok, max_seq_len=512)
    assert item["input_ids"] == smol_tok(smol_tok.apply_chat_template(CHAT["messages"], tokenize=False),
                                         add_special_tokens=False)["input_ids"]
    assert trained_text(smol_tok, item) == "Hello!<|im_end|>\n"
    assert not item["truncated"]


def test_every_assistant_turn_is_trained(smol_tok):
    item = tokenize_example(TWO_TURNS, smol_tok, max_seq_len=512)
    assert trained_text(smol_tok, item) == "2<|im_end|>\n4<|im_end|>\n"
    everything = tokenize_example(TWO_TURNS, smol_tok, max_seq_len=512, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"] == item["input_ids"]


def test_plain_text_trains_on_all_tokens_plus_eos(smol_tok):
    item = tokenize_example({"text": "The sky is blue."}, smol_tok, max_seq_len=512)
    assert item["labels"] == item["input_ids"]
    assert item["input_ids"][-1] == smol_tok.eos_token_id
    assert smol_tok.decode(item["input_ids"][:-1]) == "The sky is blue."


def test_fallback_template_without_chat_template_warns():
    tok = tiny_tokenizer()
    example = {"messages": [{"role": "user", "content": "what is 1 + 1 ?"}, {"role": "assistant", "content": "2 !"}]}
    with pytest.warns(UserWarning, match="no chat template"):
        item = tokenize_example(example, tok, max_seq_len=64)
    # "<|assistant|>\n" header is prompt; "2 !<eos>" is the trained answer.
    assert trained_text(tok, item) == "2 ! <eos>"
    assert sum(label != IGNORE_INDEX for label in item["labels"]) == 3


def test_template_that_breaks_prefix_property_is_an_error():
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(LorakitError, match="prefix by prefix"):
        tokenize_example(CHAT, tiny_tokenizer(template), max_seq_len=64)


def test_truncation_is_counted_and_answerless_examples_dropped(smol_tok):
    long_answer = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 50}]}
    train, _, stats = build_dataset([long_answer, CHAT], smol_tok, max_seq_len=40)
    assert stats["truncated"] == 1 and stats["dropped_no_labels"] == 0
    assert max(len(item["input_ids"]) for item in train) == 40
    # At 16 tokens the system prompt alone fills the window: no answer token survives, both are dropped.
    with pytest.raises(LorakitError, match="no training example has a token to learn"):
        build_dataset([long_answer, CHAT], smol_tok, max_seq_len=16)


def test_packing_keeps_tokens_and_labels_aligned(smol_tok):
    examples = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
                for i in range(12)]
    plain, _, _ = build_dataset(examples, smol_tok, max_seq_len=128)
    packed, _, stats = build_dataset(examples, smol_tok, max_seq_len=128, packing=True)
    assert stats["sequences"] == len(packed) < len(plain)
    assert all(len(p["input_ids"]) <= 128 for p in packed)
    assert sum((p["input_ids"] for p in packed), []) == sum((p["input_ids"] for p in plain), [])
    assert sum((p["labels"] for p in packed), []) == sum((p["labels"] for p in plain), [])
    assert pack([{"input_ids": [1] * 5, "labels": [1] * 5}] * 3, 10) == [
        {"input_ids": [1] * 10, "labels": [1] * 10}, {"input_ids": [1] * 5, "labels": [1] * 5}]


def test_validation_split_is_seeded_and_disjoint(smol_tok, tmp_path):
    examples = [{"text": f"document number {i}"} for i in range(20)]
    train, val, stats = build_dataset(examples, smol_tok, max_seq_len=32, val_fraction=0.25, seed=3)
    again_train, again_val, _ = build_dataset(examples, smol_tok, max_seq_len=32, val_fraction=0.25, seed=3)
    assert (len(train), len(val), stats["val_examples"]) == (15, 5, 5)
    assert val == again_val and train == again_train
    seen = {tuple(i["input_ids"]) for i in train}
    assert not seen & {tuple(i["input_ids"]) for i in val} and len(seen) == 15
    val_file = write_lines(tmp_path / "val.jsonl", [{"text": "held out"}])
    _, val, stats = build_dataset(examples, smol_tok, max_seq_len=32, val_file=val_file)
    assert stats["examples"] == 20 and smol_tok.decode(val[0]["input_ids"][:-1]) == "held out"


# ------------------------------------------------------------------------------------------- batching

def test_collate_pads_to_longest_in_batch():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["input_ids"].dtype == torch.long


def test_batch_order_is_deterministic_complete_and_groups_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    grouped = batch_order(lengths, batch_size=8, seed=1)
    assert grouped == batch_order(lengths, batch_size=8, seed=1) != batch_order(lengths, batch_size=8, seed=2)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert max(lengths[i] for i in grouped[0]) == max(lengths)

    def padding(order):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in order)

    shuffled = batch_order(lengths, batch_size=8, seed=1, group_by_length=False)
    assert sorted(i for b in shuffled for i in b) == list(range(400))
    assert padding(grouped) < padding(shuffled) / 10


def test_batches_yield_collated_tensors():
    dataset = [{"input_ids": [1] * n, "labels": [1] * n} for n in (3, 9, 4, 8, 2)]
    out = list(batches(dataset, batch_size=2, seed=0, pad_id=0))
    assert sorted(b["input_ids"].shape[0] for b in out) == [1, 2, 2]
    assert out[0]["input_ids"].shape[1] == 9  # the longest batch first
    assert sum(int(b["attention_mask"].sum()) for b in out) == 26
