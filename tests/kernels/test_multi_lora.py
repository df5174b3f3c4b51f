"""The batched multi-adapter update equals a plain loop over adapters, at several shapes, ranks and dtypes."""

import pytest
import torch
from helpers import devices

from lorakit.kernels.dispatch import TABLE, select
from lorakit.kernels.multi_lora import OP, Entries, Tables, multi_lora, multi_lora_reference

FAST = [kernel for kernel in TABLE[OP][:-1]]


def _tables(slots, rank, fan_in, fan_out, ranks, dtype, device, seed=0):
    """Tables of `slots` adapters with the given true ranks, zero-padded to `rank`, as the engine fills them."""
    gen = torch.Generator().manual_seed(seed)
    tables = Tables.zeros(slots, rank, fan_in, fan_out, dtype, device)
    for slot, r in enumerate(ranks):
        A = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
        B = torch.randn(fan_out, r, generator=gen)
        tables.load(slot, A.to(dtype).to(device), B.to(dtype).to(device))
    return tables


def _fp64_expected(out, x, tables, mixes):
    expected = out.double().clone()
    for row, mix in enumerate(mixes):
        for slot, weight in mix.items():
            expected[row] += weight * (x[row].double() @ tables.A[slot].double().t() @ tables.B[slot].double())
    return expected


CASES = [  # (rows, tokens, fan_in, fan_out, table rank, true ranks, mixes)
    (6, 1, 32, 48, 8, [8, 4, 2], [{0: 1.0}, {1: 1.0}, {}, {2: 1.0}, {0: 0.7, 1: 0.3}, {0: 1.0}]),
    (64, 1, 96, 160, 32, list(range(1, 33, 2)), [{row % 16: 1.0} for row in range(64)]),  # decoding, 16 adapters
    (30, 10, 64, 64, 16, [16, 16], [{row % 2: 1.0} for row in range(29)] + [{}]),  # prefill: 2 adapters, many rows
    (12, 7, 48, 40, 16, [16, 4, 8, 12], [{row % 4: 1.0} for row in range(12)]),  # prefill: few rows per adapter
    (9, 3, 16, 24, 64, [64, 1], [{0: -0.5, 1: 2.0}] * 9),  # negative and >1 blend weights
]


CASE_IDS = ["mixed", "decode-16", "prefill-2", "prefill-4", "blend-signs"]
# compiled_bgmv serves one token per row (its accepts check refuses more)
PAIRS = [pytest.param(case, kernel, id=f"{case_id}-{kernel.name}") for case, case_id in zip(CASES, CASE_IDS)
         for kernel in FAST if not (kernel.name == "compiled_bgmv" and case[1] > 1)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("case", "kernel"), PAIRS)
@pytest.mark.parametrize("known_ranks", [True, False], ids=["ranks", "no-ranks"])
def test_fast_kernels_equal_the_reference_and_fp64(case, kernel, dtype, device, known_ranks):
    rows, tokens, fan_in, fan_out, rank, ranks, mixes = case
    tables = _tables(len(ranks), rank, fan_in, fan_out, ranks, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, tokens, fan_in, generator=gen).to(dtype).to(device)
    out = torch.randn(rows, tokens, fan_out, generator=gen).to(dtype).to(device)
    entries = Entries.build(mixes, device, dict(enumerate(ranks)) if known_ranks else None)
    fast = kernel.fn(out.clone(), x, tables, entries)
    reference = multi_lora_reference(out.clone(), x, tables, entries)
    expected = _fp64_expected(out, x, tables, mixes)
    scale = expected.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert (fast.double() - expected).abs().max().item() <= tol * scale
    assert (reference.double() - expected).abs().max().item() <= tol * scale
    base_rows = [row for row, mix in enumerate(mixes) if not mix]
    assert torch.equal(fast[base_rows], out[base_rows])  # the base model's rows are untouched, bit for bit


def test_padding_and_absent_modules_add_exactly_nothing():
    tables = _tables(3, 16, 8, 8, [4, 4, 0], torch.float32, "cpu")  # slot 2: an adapter without this module
    assert torch.equal(tables.A_rows[-1], torch.zeros(8)) and torch.equal(tables.A[0, 4:], torch.zeros(12, 8))
    x, out = torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    entries = Entries.build([{2: 1.0}, {2: 0.5}, {}, {2: 3.0}])
    for kernel in TABLE[OP]:
        assert torch.equal(kernel.fn(out.clone(), x, tables, entries), out), kernel.name
    # a rank-4 adapter in a rank-16 table gives the same as its rank-4 factors alone
    entries = Entries.build([{0: 1.0}] * 4)
    unpadded = out + (x @ tables.A[0, :4].t()) @ tables.B[0, :4]
    assert torch.allclose(multi_lora(out.clone(), x, tables, entries), unpadded, atol=1e-6)


def test_bgmv_and_the_loop_read_no_row_past_an_adapters_true_rank():
    tables = _tables(2, 16, 8, 8, [4, 16], torch.float32, "cpu")
    tables.A[0, 4:] = 1e6  # never in a table the engine fills; here it shows which rows the kernels read
    tables.B[0, 4:] = 1e6
    x, out = torch.randn(6, 1, 8), torch.randn(6, 1, 8)
    entries = Entries.build([{row % 2: 1.0} for row in range(6)], "cpu", {0: 4, 1: 16})
    clean = _tables(2, 16, 8, 8, [4, 16], torch.float32, "cpu")
    expected = multi_lora_reference(out.clone(), x, clean, entries)
    for kernel in [k for k in FAST if k.name in ("compiled_bgmv", "segmented")]:  # gathered pads to the largest
        assert torch.allclose(kernel.fn(out.clone(), x, tables, entries), expected, atol=1e-5), kernel.name


def test_dispatch_by_rows_per_adapter_and_tokens():
    tables = _tables(16, 8, 32, 32, [8] * 16, torch.float32, "cpu")
    decode_x, decode_out = torch.randn(64, 1, 32), torch.randn(64, 1, 32)
    prefill_x, prefill_out = torch.randn(64, 8, 32), torch.randn(64, 8, 32)
    distinct = Entries.build([{row % 16: 1.0} for row in range(64)])  # 4 rows per adapter
    shared = Entries.build([{row % 2: 1.0} for row in range(64)])  # 32 rows per adapter
    single = Entries.build([{3: 1.0}] * 64)
    assert select(OP, decode_out, decode_x, tables, distinct).name == "compiled_bgmv"
    assert select(OP, prefill_out, prefill_x, tables, distinct).name == "gathered"
    assert select(OP, decode_out, decode_x, tables, shared).name == "segmented"
    assert select(OP, prefill_out, prefill_x, tables, shared).name == "segmented"
    assert select(OP, decode_out, decode_x, tables, single).name == "segmented"


def test_one_adapter_for_every_row_is_a_plain_lora_update():
    tables = _tables(2, 8, 32, 24, [8, 8], torch.float32, "cpu")
    x, out = torch.randn(5, 3, 32), torch.randn(5, 3, 24)
    single = Entries.build([{1: 1.0}] * 5)
    assert single.single and single.one_per_row and not Entries.build([{1: 1.0}] * 4 + [{}]).single
    assert not Entries.build([{1: 0.5}] * 5).single and not Entries.build([{0: 1.0}, {1: 1.0}]).single
    expected = out + (x @ tables.A[1].t()) @ tables.B[1]
    assert torch.allclose(multi_lora(out.clone(), x, tables, single), expected, atol=1e-5)


def test_entries_record_ranks_and_row_order():
    entries = Entries.build([{3: 0.5}, {}, {1: 1.0, 2: 2.0}], "cpu", {3: 8, 1: 4, 2: 16})
    assert entries.rows.tolist() == [0, 2, 2] and entries.slots.tolist() == [3, 1, 2]
    assert entries.weights.tolist() == [0.5, 1.0, 2.0] and entries.ranks.tolist() == [8, 4, 16]
    assert entries.max_rank == 16 and entries.distinct == 3 and not entries.one_per_row
    assert Entries.build([{0: 1.0}, {1: 1.0}]).one_per_row
    assert Entries.build([{0: 1.0}], "cpu", {}).max_rank is None  # unknown rank: the kernels read the table's R
    assert Entries.build([{0: 1.0}], "cpu", {}).rank_for(Tables.zeros(1, 8, 2, 2, torch.float32)) == 8
