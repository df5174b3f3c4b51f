"""Attention over per-row cache slots: the grouped kernel equals PyTorch's masked sdpa, decoding and prefill."""

import pytest
import torch
from helpers import devices

from lorakit.kernels.cache_attention import OP, cache_attention_reference, visible
from lorakit.kernels.dispatch import TABLE, select

GROUPED = TABLE[OP][0]


def test_visible_keys_end_at_each_querys_own_position():
    mask = visible(torch.tensor([0, 2]), tokens=2, length=4)
    assert mask[0].tolist() == [[True, False, False, False], [True, True, False, False]]
    assert mask[1].tolist() == [[True, True, True, False], [True, True, True, True]]


CASES = [  # (rows, heads, kv heads, tokens, starts)
    (5, 9, 3, 1, [0, 3, 17, 40, 41]),  # decoding: one query per row, rows of different lengths
    (3, 4, 4, 6, [0, 5, 11]),  # prefill chunks at different starts, no grouping
    (2, 8, 2, 16, [0, 16]),  # a second prefill chunk after a first
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=["decode-gqa", "prefill-mha", "chunks-gqa"])
def test_grouped_equals_masked_sdpa(case, dtype, device):
    rows, heads, kv_heads, tokens, starts = case
    gen = torch.Generator().manual_seed(0)
    length = max(starts) + tokens
    q = torch.randn(rows, heads, tokens, 64, generator=gen).to(dtype).to(device)
    keys = torch.randn(rows, kv_heads, length, 64, generator=gen).to(dtype).to(device)
    values = torch.randn(rows, kv_heads, length, 64, generator=gen).to(dtype).to(device)
    starts = torch.tensor(starts, device=device)
    keys[0, :, starts[0] + tokens:] = 1e4  # positions a row has not reached must not count
    expected = cache_attention_reference(q, keys, values, starts, 0.125)
    got = GROUPED.fn(q, keys, values, starts, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == expected.shape == (rows, heads, tokens, 64)
    assert (got.float() - expected.float()).abs().max().item() <= tol
    assert select(OP, q, keys, values, starts, 0.125) is GROUPED
