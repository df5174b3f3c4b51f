"""Batched greedy generation and exact-match accuracy of a causal LM on chat examples."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lorakit.train.data import render_chat

Messages = list[dict[str, str]]


def prompt_messages(example: dict) -> Messages:
    """The messages of a chat example up to (not including) its final assistant answer."""
    messages = example["messages"]
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return messages


def reference_answer(example: dict) -> str:
    """The final assistant message of a chat example: the answer exact match compares against."""
    return example["messages"][-1]["content"]


def _render(tokenizer, prompt: str | Messages) -> str:
    """A chat prompt rendered with the generation header; plain strings pass through unchanged."""
    if isinstance(prompt, str):
        return prompt
    return render_chat(tokenizer, prompt, add_generation_prompt=True)


def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts_or_messages: Sequence[str | Messages],
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of prompts, batched with left padding.

    Prompts are sorted by length so that each batch pads little; results come back in input order. Larger
    batches pad more on a CPU, where padding is paid for in full: 16 was the fastest of 16, 32 and 64.
    """
    texts = [_render(tokenizer, p) for p in prompts_or_messages]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: list[str] = [""] * len(texts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # right padding would put pad tokens between prompt and answer
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                # Chat templates already contain the special tokens; don't let the tokenizer add a bos twice.
                enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=False)
                enc = {k: v.to(_device(model)) for k, v in enc.items()}
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
                )
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[i] = text
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def _device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction equals the answer after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


def exact_match_accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence[dict],
    batch_size: int = 16,
    max_new_tokens: int = 24,
    score: Callable[[str, str], bool] = exact_match,
) -> tuple[float, list[str]]:
    """(fraction of chat examples whose greedy answer scores True against the reference, predictions)."""
    if not examples:
        return 0.0, []
    predictions = generate_batch(model, tokenizer, [prompt_messages(e) for e in examples],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = sum(score(p, reference_answer(e)) for p, e in zip(predictions, examples))
    return hits / len(examples), predictions
