"""The Triton dequant kernel is bit-identical to dequantize_4bit_reference (interpreted on the CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernel is first built; on a CPU-only machine Triton can only interpret.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from lorakit.quant.nf4 import dequantize_4bit, dequantize_4bit_reference, quantize_4bit  # noqa: E402
from lorakit.quant.triton_dequant import dequantize_4bit_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, blocksize", [((24, 256), 64), ((3001,), 128), ((5,), 32), ((2, 4096), 4096)])
def test_triton_is_bit_identical_to_reference(dtype, quant_type, double_quant, shape, blocksize):
    torch.manual_seed(blocksize)
    w = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    w.view(-1)[:blocksize] = 0.0  # an all-zero block
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    ours = dequantize_4bit_triton(packed, state)
    reference = dequantize_4bit_reference(packed, state)
    assert ours.shape == w.shape and ours.dtype == dtype
    assert torch.equal(ours.view(INT_VIEW[dtype]), reference.view(INT_VIEW[dtype]))  # bits, sign of zero too


def test_bf16_rounding_is_to_nearest_even():
    # code (+-1.0) * absmax lands exactly halfway between two bf16 numbers, with both parities;
    # truncation (TRITON_INTERPRET's own fp32->bf16 cast) would fail the first assert.
    absmax = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    w = torch.cat([torch.full((32,), -0.5), torch.tensor([1.0]), torch.zeros(31)])
    packed, state = quantize_4bit(w.to(DEVICE), 32, "nf4", double_quant=False)
    state.absmax = absmax.to(DEVICE)
    state.dtype = torch.bfloat16
    ours = dequantize_4bit_triton(packed, state).float().cpu()
    assert ours[32].item() == 1.0 + 4 * 2.0**-8  # 1 + 3/256 is a tie: rounds to the even 1 + 4/256
    assert ours[0].item() == -1.0  # -(1 + 1/256) is a tie: rounds to the even -1.0
    assert torch.equal(ours, dequantize_4bit_reference(packed, state).float().cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="dispatch to Triton happens on CUDA tensors only")
def test_dequantize_4bit_uses_triton_on_cuda():
    w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    packed, state = quantize_4bit(w, 64)
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit_reference(packed, state))
