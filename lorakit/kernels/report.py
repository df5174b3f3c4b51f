"""What `python -m lorakit.kernels` prints: per operation, the implementation that runs here and why not the others."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from lorakit.kernels import dispatch

# SmolLM2-135M training shapes: batch 4 x 256 tokens, hidden 576, 9 query / 3 key-value heads of 64.
BATCH, SEQ, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 256, 576, 1536, 9, 3, 64, 49152


def _example_state(device: str) -> Any:
    """A double-quantized NF4 state of the gate projection (QuantState's fields, blocksize 64)."""
    n = INTERMEDIATE * HIDDEN
    state2 = types.SimpleNamespace(absmax=torch.ones(n // 64 // 256, device=device))
    return types.SimpleNamespace(absmax=torch.zeros(n // 64, dtype=torch.uint8, device=device),
                                 shape=(INTERMEDIATE, HIDDEN), dtype=torch.bfloat16, blocksize=64,
                                 code=torch.zeros(16, device=device), offset=torch.zeros((), device=device),
                                 state2=state2, nested=True)


def _multi_lora_example(device: str) -> tuple:
    """A decoding step of 64 sequences over 64 distinct resident adapters (rank 16) on q_proj."""
    from lorakit.kernels.multi_lora import Entries, Tables

    rows = 64
    entries = Entries.build([{row: 1.0} for row in range(rows)], device, {row: 16 for row in range(rows)})
    return (torch.empty(rows, 1, HIDDEN, dtype=torch.bfloat16, device=device),
            torch.empty(rows, 1, HIDDEN, dtype=torch.bfloat16, device=device),
            Tables.zeros(rows, 16, HIDDEN, HIDDEN, torch.bfloat16, device), entries)


def example_inputs(device: str) -> dict[str, tuple]:
    """One typical call of every operation, on `device`, in bf16 (serving ops: a 64-row decoding step)."""
    bf16 = {"dtype": torch.bfloat16, "device": device}
    attention_module = nn.Module()
    attention_module.is_causal = True
    base = nn.Linear(HIDDEN, HIDDEN, bias=False, **bf16).requires_grad_(False)
    lora_a = torch.zeros(16, HIDDEN, device=device, requires_grad=True)
    lora_b = torch.zeros(HIDDEN, 16, device=device, requires_grad=True)
    return {
        "dequantize_4bit": (torch.empty(INTERMEDIATE * HIDDEN // 2, dtype=torch.uint8, device=device),
                            _example_state(device), torch.bfloat16),
        "attention": (attention_module, torch.empty(BATCH, HEADS, SEQ, HEAD_DIM, **bf16),
                      torch.empty(BATCH, KV_HEADS, SEQ, HEAD_DIM, **bf16),
                      torch.empty(BATCH, KV_HEADS, SEQ, HEAD_DIM, **bf16), None, 0.0, None, None, {}),
        "silu_mul": (torch.empty(BATCH, SEQ, INTERMEDIATE, **bf16), torch.empty(BATCH, SEQ, INTERMEDIATE, **bf16)),
        "rms_norm": (torch.empty(BATCH, SEQ, HIDDEN, **bf16), torch.ones(HIDDEN, **bf16), 1e-5),
        "lora_linear": (torch.empty(BATCH, SEQ, HIDDEN, **bf16), base, lora_a, lora_b, nn.Identity(), 2.0),
        "dora_linear": (torch.empty(BATCH, SEQ, HIDDEN, **bf16), base, lora_a, lora_b,
                        torch.ones(HIDDEN, device=device, requires_grad=True), nn.Identity(), 2.0,
                        lambda dtype: base.weight, lambda weight: torch.ones(HIDDEN, device=device)),
        "multi_lora": _multi_lora_example(device),
        "cache_attention": (torch.empty(64, HEADS, 1, HEAD_DIM, **bf16),
                            torch.empty(64, KV_HEADS, 160, HEAD_DIM, **bf16),
                            torch.empty(64, KV_HEADS, 160, HEAD_DIM, **bf16),
                            torch.full((64,), 159, dtype=torch.long, device=device), HEAD_DIM**-0.5),
        "cross_entropy": (torch.empty(BATCH, SEQ, HIDDEN, **bf16), torch.empty(VOCAB, HIDDEN, **bf16),
                          torch.zeros(BATCH, SEQ, dtype=torch.long, device=device)),
    }


def report_lines(device: str | None = None) -> list[str]:
    """The report, one line per operation and one per implementation."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"lorakit kernels on {device} (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"torch {torch.__version__}), for SmolLM2-135M shapes in bf16 (training; serving: 64 rows decoding):"]
    with torch.enable_grad():
        for op, args in example_inputs(device).items():
            chosen = dispatch.select(op, *args)
            lines.append(f"{op:<16} uses {chosen.name}")
            for kernel in dispatch.TABLE[op]:
                if kernel is chosen:
                    continue
                reason = dispatch.why_not(kernel, op, *args)
                if kernel is dispatch.reference(op):
                    reason = f"the reference (always applies); {chosen.name} comes first"
                elif reason is None:
                    reason = f"applies, but {chosen.name} comes first"
                lines.append(f"    {kernel.name:<14} not used: {reason}")
    return lines
