"""Training data: read JSONL (chat, Alpaca or plain text), tokenize with completion-only labels, pack, batch.

Every example becomes ``{"input_ids": [...], "labels": [...]}``; labels are ``-100`` where no loss is
taken. By default a chat example trains only on the assistant's tokens (its content and the template's
end-of-turn tokens); ``train_on_prompt=True`` trains on everything; plain text always trains on all.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from lorakit.errors import LorakitError, LorakitWarning

IGNORE_INDEX = -100  # the label value torch's cross_entropy (and HF models) skip
ROLES = ("system", "user", "assistant")
# Used only when a tokenizer has no chat template; the eos token ends each turn so the model learns to stop:
#   <|system|>\n{content}{eos}\n<|user|>\n{content}{eos}\n<|assistant|>\n{content}{eos}\n
FALLBACK_GENERATION_PROMPT = "<|assistant|>\n"
_FORMAT_HELP = 'expected "messages" (chat), "instruction" + "output" (Alpaca) or "text" (plain)'


# ---------------------------------------------------------------------------------------- reading files

def _check_chat(record: dict, where: str) -> dict:
    """Validate a chat record; return it as {"messages": [...]}."""
    messages = record["messages"]
    shape = '"messages" must be a list of {"role","content"} objects'
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else type(messages).__name__
        raise LorakitError(f"{where}: {shape}, got {got}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise LorakitError(f"{where}: {shape}, messages[{i}] is {json.dumps(message)[:60]}")
        if message["role"] not in ROLES:
            raise LorakitError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got "
                               f"{json.dumps(message['role'])}")
        if not isinstance(message["content"], str):
            raise LorakitError(f"{where}: messages[{i}].content must be a string, got "
                               f"{type(message['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise LorakitError(f"{where}: no assistant message; a chat example needs one to train on")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def _check_alpaca(record: dict, where: str) -> dict:
    """Validate an Alpaca record; return it as a user/assistant chat example."""
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        if key not in record:
            if required:
                raise LorakitError(f'{where}: Alpaca record is missing "{key}"')
            continue
        if not isinstance(record[key], str):
            raise LorakitError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": record["output"]}]}


def _check_text(record: dict, where: str) -> dict:
    """Validate a plain-text record."""
    if not isinstance(record["text"], str) or not record["text"]:
        got = json.dumps(record["text"])[:40]
        raise LorakitError(f'{where}: "text" must be a non-empty string, got {got}')
    return {"text": record["text"]}


_CHECKS = {"chat": _check_chat, "alpaca": _check_alpaca, "text": _check_text}


def record_format(record: dict) -> str | None:
    """'chat', 'alpaca' or 'text' by the record's keys; None if it matches none."""
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def normalize_records(records: Sequence[object], source: str,
                      line_numbers: Sequence[int] | None = None) -> list[dict]:
    """Validate records of one source (all in the first record's format) into chat or text examples.

    Errors name ``source:N`` with N from ``line_numbers`` (default: the 0-based index).
    """
    if not records:
        raise LorakitError(f"{source}: no examples (empty); expected one JSON object per line")
    line_numbers = list(line_numbers) if line_numbers is not None else list(range(len(records)))
    examples, first_format = [], None
    for record, lineno in zip(records, line_numbers):
        where = f"{source}:{lineno}"
        if not isinstance(record, dict):
            raise LorakitError(f"{where}: each example must be a JSON object, got {type(record).__name__}")
        fmt = record_format(record)
        if fmt is None:
            raise LorakitError(f"{where}: unknown record with keys {sorted(record)}; {_FORMAT_HELP}")
        if first_format is None:
            first_format = fmt
        elif fmt != first_format:
            raise LorakitError(f"{where}: {fmt} record, but the first record ({source}:{line_numbers[0]}) is "
                               f"{first_format}; use one format per file")
        examples.append(_CHECKS[fmt](record, where))
    return examples


def load_examples(path: str | Path) -> list[dict]:
    """Read a JSONL file (blank lines skipped) into chat ({"messages"}) or text ({"text"}) examples."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: no such data file; expected a JSONL file, one example per line")
    records, line_numbers = [], []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LorakitError(f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                   f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LorakitError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            line_numbers.append(lineno)
    return normalize_records(records, str(path), line_numbers)


# ---------------------------------------------------------------------------------------- tokenizing

def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Messages as text with the tokenizer's chat template, or the documented fallback if it has none."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    warnings.warn("tokenizer has no chat template; using lorakit's fallback '<|role|>\\n...' template",
                  stacklevel=2)
    eos = tokenizer.eos_token or ""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in messages)
    return text + (FALLBACK_GENERATION_PROMPT if add_generation_prompt else "")


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of text without extra special tokens (chat templates already contain them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_labels(example: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """(input ids, per-token "is assistant output" mask) of a chat example.

    Each assistant turn's span is found by rendering the conversation up to it (with the generation
    prompt) and including it, and requiring the first token list to be a prefix of the second.
    """
    messages = example["messages"]
    input_ids = _ids(tokenizer, render_chat(tokenizer, messages))
    is_answer = [False] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer, render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        through = _ids(tokenizer, render_chat(tokenizer, messages[: i + 1]))
        if through[: len(before)] != before or input_ids[: len(through)] != through:
            raise LorakitError(
                f"the chat template does not render conversations prefix by prefix (at message {i}), so the "
                "assistant tokens cannot be located; pass train_on_prompt=True or use another template"
            )
        is_answer[len(before) : len(through)] = [True] * (len(through) - len(before))
    return input_ids, is_answer


def tokenize_example(example: dict, tokenizer, max_seq_len: int = 512, train_on_prompt: bool = False) -> dict:
    """{"input_ids", "labels", "truncated"} of one chat or text example, cut to ``max_seq_len`` tokens."""
    if "text" in example:
        input_ids = tokenizer(example["text"])["input_ids"]
        if tokenizer.eos_token_id is not None:
            input_ids = input_ids + [tokenizer.eos_token_id]  # so the model learns where a document ends
        trained = [True] * len(input_ids)
    else:
        input_ids, trained = _chat_labels(example, tokenizer)
        if train_on_prompt:
            trained = [True] * len(input_ids)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, trained)]
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len],
            "truncated": len(input_ids) > max_seq_len}


def pack(items: Sequence[dict], max_seq_len: int) -> list[dict]:
    """Concatenate consecutive tokenized examples into sequences of at most ``max_seq_len`` tokens.

    Labels stay aligned with their tokens. Attention crosses example boundaries inside a pack (as in
    TRL's classic packing); with short, independent examples this costs little and removes padding.
    """
    packs, ids, labels = [], [], []
    for item in items:
        if ids and len(ids) + len(item["input_ids"]) > max_seq_len:
            packs.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids, labels = ids + item["input_ids"], labels + item["labels"]
    if ids:
        packs.append({"input_ids": ids, "labels": labels})
    return packs


# ---------------------------------------------------------------------------------------- datasets

def _as_examples(source) -> list[dict]:
    """Examples from a path, a list of paths, or a list of example dicts."""
    if isinstance(source, (str, Path)):
        return load_examples(source)
    source = list(source)
    if source and all(isinstance(s, (str, Path)) for s in source):
        return [e for path in source for e in load_examples(path)]
    return normalize_records(source, "<examples>")


def _tokenize_all(examples: list[dict], tokenizer, max_seq_len: int, train_on_prompt: bool,
                  stats: dict, prefix: str) -> list[dict]:
    """Tokenize examples, count truncations, and drop those left with no trained token."""
    items, truncated, dropped = [], 0, 0
    for example in examples:
        item = tokenize_example(example, tokenizer, max_seq_len, train_on_prompt)
        truncated += item.pop("truncated")
        if all(label == IGNORE_INDEX for label in item["labels"]):
            dropped += 1  # its answer was cut off entirely: no loss to take
            continue
        items.append(item)
    stats.update({f"{prefix}examples": len(examples), f"{prefix}truncated": truncated,
                  f"{prefix}dropped_no_labels": dropped,
                  f"{prefix}tokens": sum(len(i["input_ids"]) for i in items),
                  f"{prefix}label_tokens": sum(sum(t != IGNORE_INDEX for t in i["labels"]) for i in items)})
    return items


def has_empty_answer(example: dict) -> bool:
    """A chat example whose assistant messages are all empty (or whitespace)."""
    return "messages" in example and not any(m["content"].strip() for m in example["messages"]
                                             if m["role"] == "assistant")


def empty_answers(examples: Sequence[dict]) -> int:
    """Chat examples whose assistant messages are all empty (or whitespace)."""
    return sum(map(has_empty_answer, examples))


def check_answers(examples: Sequence[dict], source: str) -> int:
    """Refuse data whose every answer is empty, warn when some are (they are left out); returns how many."""
    empty = empty_answers(examples)
    if empty and empty == len(examples):
        raise LorakitError(f"{source}: every assistant message is empty, so the adapter would only learn to "
                           "stop at once; fill in the answers")
    if empty:
        warnings.warn(f"{source}: {empty} of {len(examples)} examples have an empty assistant message; they are "
                      "left out (they would teach the adapter to answer with nothing)", LorakitWarning, stacklevel=2)
    return empty


def build_dataset(paths_or_examples, tokenizer, max_seq_len: int = 512, packing: bool = False,
                  val_file: str | Path | None = None, val_fraction: float = 0.0, seed: int = 0,
                  train_on_prompt: bool = False, source: str = "training data") -> tuple[list[dict], list[dict], dict]:
    """(train items, validation items, stats) from files or examples; validation comes from ``val_file`` or
    a seeded ``val_fraction`` of the examples, and is never packed. Stats count truncated/dropped examples
    and empty answers (all empty is an error, some a warning)."""
    if max_seq_len < 2:
        raise LorakitError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise LorakitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_file is not None and val_fraction:
        raise LorakitError("give either val_file or val_fraction, not both")
    examples = _as_examples(paths_or_examples)
    empty = check_answers(examples, str(source))
    examples = [example for example in examples if not has_empty_answer(example)]
    if val_file is not None:
        val_examples = load_examples(val_file)
    elif val_fraction:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(examples) * val_fraction))
        if n_val >= len(examples):
            raise LorakitError(f"val_fraction={val_fraction} leaves no training example of {len(examples)}")
        val_examples = [examples[i] for i in sorted(order[:n_val])]
        examples = [examples[i] for i in sorted(order[n_val:])]
    else:
        val_examples = []
    stats: dict = {"max_seq_len": max_seq_len, "empty_answers": empty}
    train = _tokenize_all(examples, tokenizer, max_seq_len, train_on_prompt, stats, "")
    val = _tokenize_all(val_examples, tokenizer, max_seq_len, train_on_prompt, stats, "val_")
    if packing:
        train = pack(train, max_seq_len)
    stats["sequences"] = len(train)
    if not train:
        raise LorakitError(f"no training example has a token to learn from at max_seq_len={max_seq_len}; "
                           "raise max_seq_len")
    return train, val, stats


# ---------------------------------------------------------------------------------------- batching

def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest item: ``input_ids``, ``attention_mask``, ``labels`` (-100 on pad)."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_order(lengths: Sequence[int], batch_size: int, seed: int,
                group_by_length: bool = True) -> list[list[int]]:
    """Index batches for one epoch, deterministic for ``seed``.

    With ``group_by_length``, shuffled indices are cut into mega-batches of 50 batches, each sorted by
    length before cutting into batches (little padding, still random); the batch holding the longest
    sequence goes first, so an out-of-memory shows up at step one rather than mid-run.
    """
    if batch_size < 1:
        raise LorakitError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]), default=0)
    if batches:
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def batches(dataset: Sequence[dict], batch_size: int, seed: int, group_by_length: bool = True,
            pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches over one epoch of ``dataset`` in ``batch_order``."""
    lengths = [len(item["input_ids"]) for item in dataset]
    for indices in batch_order(lengths, batch_size, seed, group_by_length):
        yield collate([dataset[i] for i in indices], pad_id)
