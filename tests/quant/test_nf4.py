"""NF4/FP4 quantization: bit-exact against bitsandbytes 0.50.2 on the CPU.

Trap (facts §2.5): bnb 0.50.2's AVX-512 CPU dequant is wrong when the last dim is a multiple of 16
but not of the blocksize. So 2-D test shapes have a last dim that is a multiple of the blocksize,
and partial blocks are tested with odd-length 1-D tensors (bnb falls back to its torch path there).
"""

import bitsandbytes.functional as bnbF
import pytest
import torch

import lorakit.quant.nf4 as nf4
from lorakit.errors import LorakitError
from lorakit.quant.nf4 import (
    ALLOWED_BLOCKSIZES,
    FP4_CODE,
    NF4_CODE,
    QuantState,
    dequantize_4bit,
    dequantize_4bit_reference,
    quantize_4bit,
)

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so comparisons are bit-exact (and see the sign of zero)."""
    return t.contiguous().view(INT_VIEW[t.dtype])


def bnb_quantize(w, blocksize, quant_type, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def bnb_dequantize(packed, state):
    # bnb's torch fallback is wrapped in torch.compile; eager is the same math without compile time.
    with torch.compiler.set_stance("force_eager"):
        return bnbF.dequantize_4bit(packed, state)


def assert_dequant_equal(ours, theirs, quant_type):
    """Bit-exact, except fp16 may differ by 1 ulp (facts §2.5) and FP4 code 8 is -0.0 for us, +0.0 in bnb CPU."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if quant_type == "fp4":
        ours, theirs = ours + 0.0, theirs + 0.0  # -0.0 + 0.0 == +0.0: compare up to the sign of zero
    if ours.dtype == torch.float16:
        assert (bits(ours).int() - bits(theirs).int()).abs().max().item() <= 1
    else:
        assert torch.equal(bits(ours), bits(theirs))


def test_code_tables():
    assert torch.equal(NF4_CODE.view(torch.int32), bnbF.get_4bit_type("nf4", device="cpu").view(torch.int32))
    assert NF4_CODE.view(torch.int32)[1].item() == 0xBF3239B1 - 2**32  # facts §2.1 hex bits
    assert torch.equal(FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))  # by value
    # Index = bit pattern, index 8 is -0.0 (CUDA's dDequantizeFP4Tree); bnb's CPU table has +0.0 there.
    assert torch.signbit(FP4_CODE[8]) and not torch.signbit(FP4_CODE[0])
    assert FP4_CODE[1].item() == pytest.approx(0.0052083334885537624, abs=0)


def grid_tensor(shape, dtype, seed):
    """Normal values with an outlier block, an all-zero block and a partly-zero block."""
    torch.manual_seed(seed)
    w = torch.randn(shape).view(-1)
    w[: w.numel() // 8] = 0.0  # whole zero blocks at the start
    w[w.numel() // 2] = 1e4  # one huge value in a block
    w[-(w.numel() // 5):: 3] = 0.0
    return w.view(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bit_exact_with_bitsandbytes(dtype, blocksize, quant_type):
    cols = max(blocksize, 256)
    for shape in [(4096 // cols + 1, cols), (2 * blocksize + 37,), (blocksize - 3,)]:
        w = grid_tensor(shape, dtype, seed=blocksize)
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant=False)
        packed_bnb, state_bnb = bnb_quantize(w, blocksize, quant_type, False)
        assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2, 1)
        assert torch.equal(packed, packed_bnb)
        assert torch.equal(bits(state.absmax), bits(state_bnb.absmax))
        assert state.shape == w.shape and state.dtype == dtype and not state.nested
        ours = dequantize_4bit(packed, state)
        assert_dequant_equal(ours, bnb_dequantize(packed_bnb, state_bnb), quant_type)
        assert not torch.isnan(ours).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 512), (70_001,)])
def test_double_quant_matches_bitsandbytes(dtype, quant_type, shape):
    w = grid_tensor(shape, dtype, seed=3)
    packed, state = quantize_4bit(w, 64, quant_type, double_quant=True)
    packed_bnb, state_bnb = bnb_quantize(w, 64, quant_type, True)
    assert torch.equal(packed, packed_bnb)  # the 4-bit codes do not depend on the nesting
    assert state.nested and state.absmax.dtype == torch.uint8
    assert torch.equal(bits(state.offset), bits(state_bnb.offset))
    assert torch.equal(bits(state.state2.absmax), bits(state_bnb.state2.absmax))
    assert torch.equal(bits(state.state2.code), bits(state_bnb.state2.code))
    assert state.state2.blocksize == 256 and state.state2.absmax.shape == (-(-state.absmax.numel() // 256),)
    # bnb's CPU 8-bit step is an approximate LUT (facts §2.9): its nested codes differ for a few blocks
    # (measured 98.9% identical here; absmax - mean clusters near 0, where the LUT is coarsest), and
    # where they differ ours is the nearer one.
    same_block = state.absmax == state_bnb.absmax
    assert same_block.float().mean().item() >= 0.98
    assert (state.absmax.int() - state_bnb.absmax.int()).abs().max().item() <= 4
    _, flat_state = quantize_4bit(w, 64, quant_type, double_quant=False)
    bnb_absmax = bnbF.dequantize_blockwise(state_bnb.absmax, state_bnb.state2) + state_bnb.offset
    our_err = (state.absmax_fp32() - flat_state.absmax).abs()
    assert torch.all(our_err <= (bnb_absmax - flat_state.absmax).abs() + 1e-6 * flat_state.absmax.max())
    ours = dequantize_4bit(packed, state).float().view(-1, 64) if shape[-1] % 64 == 0 else None
    if ours is not None:
        theirs = bnb_dequantize(packed_bnb, state_bnb).float().view(-1, 64)
        assert torch.equal(ours[same_block] + 0.0, theirs[same_block] + 0.0)
        absmax_gap = (state.absmax_fp32() - bnb_absmax).abs()
        assert torch.all((ours - theirs).abs() <= absmax_gap.unsqueeze(1) * 1.0001)


def test_nested_absmax_is_close_to_the_exact_absmax():
    torch.manual_seed(0)
    w = torch.randn(256, 1024) * 0.02
    _, flat_state = quantize_4bit(w, 64, "nf4", double_quant=False)
    _, state = quantize_4bit(w, 64, "nf4", double_quant=True)
    err = (state.absmax_fp32() - flat_state.absmax).abs()
    assert err.max().item() <= 0.01 * flat_state.absmax.max().item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_exact_midpoints_go_to_the_lower_code(quant_type):
    code = NF4_CODE if quant_type == "nf4" else FP4_CODE
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2  # fp32 midpoints, as bitsandbytes computes them
    w = torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 1 - mids.numel())])  # absmax 1: scaled == w
    packed, _ = quantize_4bit(w, 64, quant_type, double_quant=False)
    idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=1).view(-1)
    assert torch.equal(idx[1:16].long(), order[:15])  # the lower of the two neighbouring codes
    assert torch.equal(packed, bnb_quantize(w, 64, quant_type, False)[0])


def test_packing_order_and_odd_padding():
    w = torch.tensor([1.0, -1.0, 0.0])  # NF4 codes 15, 0, 7 (+ a padding 0.0 -> 7)
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=False)
    assert packed.view(-1).tolist() == [0xF0, 0x77]
    assert dequantize_4bit(packed, state).tolist() == [1.0, -1.0, 0.0]


def test_fp4_tiny_values_and_zero_codes_match_bitsandbytes():
    w = torch.tensor([1.0, 1e-6, -1e-6, 0.0, -0.0] * 13)
    packed, _ = quantize_4bit(w, 64, "fp4", double_quant=False)
    assert torch.equal(packed, bnb_quantize(w, 64, "fp4", False)[0])


def test_all_zero_partial_block_stores_bnb_clamped_absmax():
    w = torch.cat([torch.randn(64), torch.zeros(33)])
    _, state = quantize_4bit(w, 64, "nf4", double_quant=False)
    assert state.absmax[1].item() == pytest.approx(1e-38, rel=1e-6)  # bnb clamps the partial block only
    assert torch.equal(state.absmax, bnb_quantize(w, 64, "nf4", False)[1].absmax)


def test_chunked_paths_match_bitsandbytes(monkeypatch):
    monkeypatch.setattr(nf4, "_CHUNK_ELEMS", 128)  # force many chunks on a small tensor
    w = grid_tensor((5 * 64 + 31,), torch.bfloat16, seed=7)
    packed, state = quantize_4bit(w, 32, "nf4", double_quant=False)
    packed_bnb, state_bnb = bnb_quantize(w, 32, "nf4", False)
    assert torch.equal(packed, packed_bnb) and torch.equal(state.absmax, state_bnb.absmax)
    assert_dequant_equal(dequantize_4bit_reference(packed, state), bnb_dequantize(packed_bnb, state_bnb), "nf4")


def test_non_contiguous_input_quantizes_like_its_contiguous_copy():
    w = torch.randn(128, 256).t()
    packed, state = quantize_4bit(w, 64)
    packed_c, _ = quantize_4bit(w.contiguous(), 64)
    assert torch.equal(packed, packed_c) and state.shape == (256, 128)


def test_input_is_not_modified():
    w = torch.randn(64, 128)
    before = w.clone()
    quantize_4bit(w, 64, "nf4")
    assert torch.equal(w, before)


def test_round_trip_error_nf4_beats_fp4():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    errors = {}
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, 64, quant_type, double_quant=False)
        w_hat = dequantize_4bit(packed, state)
        errors[quant_type] = (w_hat - w).pow(2).mean().item()
        # nearest code: the error is at most half the widest code gap, times the block absmax
        half_gap = (torch.sort(state.code).values.diff().max() / 2).item()
        block_err = (w_hat - w).abs().view(-1, 64).amax(dim=1)
        assert torch.all(block_err <= half_gap * state.absmax * (1 + 1e-6))
    assert errors["nf4"] < errors["fp4"]
    assert errors["nf4"] < 0.012  # ~0.0099 for N(0,1) at blocksize 64


def test_quant_state_to_nbytes_and_absmax():
    w = torch.randn(64, 128)
    packed, state = quantize_4bit(w, 64, "nf4", double_quant=True)
    # 128 uint8 absmax + 16 fp32 code + fp32 offset + nested: 1 fp32 absmax + 256 fp32 code
    assert state.nbytes() == 128 + 64 + 4 + 4 + 1024
    moved = state.to("cpu")
    assert moved is not state and moved.nested and torch.equal(moved.absmax, state.absmax)
    _, flat = quantize_4bit(w, 64, "nf4", double_quant=False)
    assert flat.nbytes() == 128 * 4 + 64 and torch.equal(flat.absmax_fp32(), flat.absmax)
    assert isinstance(state, QuantState) and state.absmax_fp32().dtype == torch.float32


def test_dequantize_dispatches_to_reference_on_cpu():
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    packed, state = quantize_4bit(w, 32)
    assert torch.equal(bits(dequantize_4bit(packed, state)), bits(dequantize_4bit_reference(packed, state)))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quantize_4bit(torch.randn(64), blocksize=48), "blocksize 48 is not allowed"),
        (lambda: quantize_4bit(torch.randn(64), blocksize=64.0), "blocksize 64.0 is not allowed"),
        (lambda: quantize_4bit(torch.randn(64), quant_type="int4"), "unknown quant_type 'int4'"),
        (lambda: quantize_4bit(torch.ones(64, dtype=torch.int8)), "integer and bool"),
        (lambda: quantize_4bit(torch.ones(64, dtype=torch.bool)), "integer and bool"),
        (lambda: quantize_4bit(torch.randn(0, 64)), "empty"),
        (lambda: quantize_4bit(torch.randn(2, 4, 64)), "3-D tensor.*must be 1-D or 2-D"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(LorakitError, match=message):
        call()


def test_dequantize_rejects_mismatched_state():
    packed, state = quantize_4bit(torch.randn(64, 64), 64)
    with pytest.raises(LorakitError, match="needs 2048"):
        dequantize_4bit(packed[:100], state)
