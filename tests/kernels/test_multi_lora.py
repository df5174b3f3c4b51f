"""The batched multi-adapter update equals a plain loop over adapters, at several shapes, ranks and dtypes."""

import pytest
import torch
from helpers import devices

from lorakit.kernels.dispatch import TABLE, select
from lorakit.kernels.multi_lora import OP, Entries, multi_lora, multi_lora_reference

FAST = [kernel for kernel in TABLE[OP][:-1]]


def _tables(slots, rank, fan_in, fan_out, ranks, dtype, device, seed=0):
    """Tables of `slots` adapters with the given true ranks, zero-padded to `rank`, as the engine fills them."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.zeros(slots, rank, fan_in)
    B = torch.zeros(slots, fan_out, rank)
    for slot, r in enumerate(ranks):
        A[slot, :r] = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
        B[slot, :, :r] = torch.randn(fan_out, r, generator=gen)
    return A.to(dtype).to(device), B.to(dtype).to(device)


def _fp64_expected(out, x, A, B, mixes):
    expected = out.double().clone()
    for row, mix in enumerate(mixes):
        for slot, weight in mix.items():
            expected[row] += weight * (B[slot].double() @ (A[slot].double() @ x[row].double()))
    return expected


CASES = [  # (rows, fan_in, fan_out, table rank, true ranks, mixes)
    (6, 32, 48, 8, [8, 4, 2], [{0: 1.0}, {1: 1.0}, {}, {2: 1.0}, {0: 0.7, 1: 0.3}, {0: 1.0}]),
    (64, 96, 160, 32, list(range(1, 33, 2)), [{row % 16: 1.0} for row in range(64)]),  # decoding, 16 adapters
    (300, 64, 64, 16, [16, 16], [{row % 2: 1.0} for row in range(299)] + [{}]),  # prefill-like: many rows each
    (9, 16, 24, 64, [64, 1], [{0: -0.5, 1: 2.0}] * 9),  # negative and >1 blend weights
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", FAST, ids=[k.name for k in FAST])
@pytest.mark.parametrize("case", CASES, ids=["mixed", "decode-16", "prefill-2", "blend-signs"])
def test_fast_kernels_equal_the_reference_and_fp64(case, kernel, dtype, device):
    rows, fan_in, fan_out, rank, ranks, mixes = case
    A, B = _tables(len(ranks), rank, fan_in, fan_out, ranks, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, fan_in, generator=gen).to(dtype).to(device)
    out = torch.randn(rows, fan_out, generator=gen).to(dtype).to(device)
    entries = Entries.build(mixes, device, dict(enumerate(ranks)))  # the loop then reads no padding
    fast = kernel.fn(out.clone(), x, A, B, entries)
    reference = multi_lora_reference(out.clone(), x, A, B, entries)
    expected = _fp64_expected(out, x, A, B, mixes)
    scale = expected.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert (fast.double() - expected).abs().max().item() <= tol * scale
    assert (reference.double() - expected).abs().max().item() <= tol * scale
    base_rows = [row for row, mix in enumerate(mixes) if not mix]
    assert torch.equal(fast[base_rows], out[base_rows])  # the base model's rows are untouched, bit for bit


def test_padding_and_absent_modules_add_exactly_nothing():
    A, B = _tables(3, 16, 8, 8, [4, 4, 0], torch.float32, "cpu")  # slot 2: an adapter without this module
    x, out = torch.randn(4, 8), torch.randn(4, 8)
    entries = Entries.build([{2: 1.0}, {2: 0.5}, {}, {2: 3.0}])
    for kernel in TABLE[OP]:
        assert torch.equal(kernel.fn(out.clone(), x, A, B, entries), out), kernel.name
    # a rank-4 adapter in a rank-16 table gives the same as its rank-4 factors alone
    entries = Entries.build([{0: 1.0}] * 4)
    unpadded = out + (x @ A[0, :4].t()) @ B[0, :, :4].t()
    assert torch.allclose(multi_lora(out.clone(), x, A, B, entries), unpadded, atol=1e-6)


def test_dispatch_gathers_for_few_rows_per_adapter_and_segments_for_many():
    A, B = _tables(16, 8, 32, 32, [8] * 16, torch.float32, "cpu")
    x, out = torch.randn(64, 32), torch.randn(64, 32)
    distinct = Entries.build([{row % 16: 1.0} for row in range(64)])  # 4 rows per adapter
    shared = Entries.build([{row % 2: 1.0} for row in range(64)])  # 32 rows per adapter
    assert select(OP, out, x, A, B, distinct).name == "compiled_bgmv"
    assert select(OP, out, x, A, B, shared).name == "segmented"
    assert select(OP, out, x, A, B, distinct.expand(8)).name == "segmented"  # prefill: many tokens per adapter


def test_one_adapter_for_every_row_is_a_plain_lora_update():
    A, B = _tables(2, 8, 32, 24, [8, 8], torch.float32, "cpu")
    x, out = torch.randn(5, 32), torch.randn(5, 24)
    single = Entries.build([{1: 1.0}] * 5)
    assert single.single and not Entries.build([{1: 1.0}] * 4 + [{}]).single
    assert not Entries.build([{1: 0.5}] * 5).single and not Entries.build([{0: 1.0}, {1: 1.0}]).single
    expected = multi_lora_reference(out.clone(), x, A, B, single)
    assert torch.allclose(multi_lora(out.clone(), x, A, B, single), expected, atol=1e-5)
    x3, out3 = torch.randn(15, 32), torch.randn(15, 24)  # the same rows as [5, 3 tokens, ...]
    assert torch.allclose(multi_lora(out3.clone(), x3, A, B, single.expand(3)),
                          multi_lora_reference(out3.clone(), x3, A, B, single.expand(3)), atol=1e-5)


def test_entries_expand_over_tokens():
    entries = Entries.build([{3: 0.5}, {}, {1: 1.0, 2: 2.0}])
    expanded = entries.expand(2)  # rows 0, 1, 2 of [3, 2, in] -> rows 0-1, 2-3, 4-5 of [6, in]
    assert expanded.rows.tolist() == [0, 1, 4, 5, 4, 5]
    assert expanded.slots.tolist() == [3, 3, 1, 1, 2, 2]
    assert expanded.weights.tolist() == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]
