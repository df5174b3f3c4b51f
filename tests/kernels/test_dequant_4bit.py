"""Every 4-bit dequantization kernel is bit-identical to the reference, and the dispatch picks as documented."""

import os

import pytest
import torch
from helpers import devices

if not torch.cuda.is_available():
    # Must be set before the Triton kernel is first built; on a CPU-only machine Triton can only interpret.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lorakit.kernels import dequant_4bit  # noqa: E402
from lorakit.kernels.dispatch import select  # noqa: E402
from lorakit.quant.nf4 import dequantize_4bit, dequantize_4bit_reference, quantize_4bit  # noqa: E402

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
needs_avx512 = pytest.mark.skipif(not AVX512, reason="the C++ kernel is built only for AVX-512 CPUs")
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _weight(rows: int, cols: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    w[3, :64] = 0  # an all-zero block
    w[7, 5] = 4.0  # an outlier
    return w.to(dtype).to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


def _choice(packed, state, dtype) -> str:
    return select(dequant_4bit.OP, packed, state, dtype).name


# --- the compiled loop ------------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_compiled_loop_equals_reference(quant_type, double_quant, src_dtype, out_dtype):
    w = (torch.randn(384, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(src_dtype)
    w[3, :64] = 0  # an all-zero block
    w[7, 5] = 4.0  # an outlier
    packed, state = quantize_4bit(w, 64, quant_type, double_quant)
    assert dequant_4bit._loop_accepts(packed, state, out_dtype) is None
    fast = dequant_4bit.compiled_loop(packed, state, out_dtype)
    ref = dequantize_4bit_reference(packed, state).to(out_dtype)
    assert fast.dtype == out_dtype and fast.shape == w.shape
    assert torch.equal(_bits(fast), _bits(ref))


def test_dispatch_uses_reference_for_small_or_partial_tensors():
    w = torch.randn(100, 3)  # 300 elements: not a whole number of blocks, and small
    packed, state = quantize_4bit(w, 64, "nf4", True)
    assert _choice(packed, state, torch.float32) == "reference"
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit_reference(packed, state))


# --- the AVX-512 C++ kernel ---------------------------------------------------------------------------

@needs_avx512
def test_avx512_builds_on_an_avx512_cpu():
    assert dequant_4bit._avx512_machine() is None  # a failed build would silently cost QLoRA its fast path


@needs_avx512
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
def test_avx512_equals_reference(quant_type, double_quant, blocksize, src_dtype, out_dtype):
    w = _weight(384, 512, src_dtype)
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    assert _choice(packed, state, out_dtype) == "avx512"
    fast = dequant_4bit.avx512(packed, state, out_dtype)
    ref = dequantize_4bit_reference(packed, state).to(out_dtype)
    assert fast.dtype == out_dtype and fast.shape == w.shape
    assert torch.equal(_bits(fast), _bits(ref))


@needs_avx512
def test_dequantize_4bit_takes_avx512_for_large_cpu_tensors_with_the_same_bits():
    w = _weight(1536, 576, torch.bfloat16)  # SmolLM2's gate/up shape
    packed, state = quantize_4bit(w, 64, "nf4", True)
    out = dequantize_4bit(packed, state, torch.bfloat16)
    assert torch.equal(_bits(out), _bits(dequantize_4bit_reference(packed, state)))


def test_avx512_not_chosen_where_one_rounding_would_differ_or_blocks_do_not_fit():
    w = _weight(256, 256, torch.bfloat16)
    packed, state = quantize_4bit(w, 64, "nf4", True)
    # bf16 weights to fp32: the reference rounds to bf16 first; fp16 output is not built
    assert dequant_4bit._avx512_accepts(packed, state, torch.float32) is not None
    assert dequant_4bit._avx512_accepts(packed, state, torch.float16) is not None
    assert _choice(packed, state, torch.float16) == "compiled_loop"
    odd = quantize_4bit(torch.randn(100, 3), 64, "nf4", True)  # 300 elements: a partial block
    assert dequant_4bit._avx512_accepts(*odd, torch.float32) is not None


def test_forced_reference_takes_the_reference_with_the_same_bits(monkeypatch):
    packed, state = quantize_4bit(_weight(1536, 576, torch.bfloat16), 64, "nf4", True)
    fast = dequantize_4bit(packed, state, torch.bfloat16)
    monkeypatch.setenv("LORAKIT_KERNELS", "reference")
    assert _choice(packed, state, torch.bfloat16) == "reference"
    assert torch.equal(_bits(dequantize_4bit(packed, state, torch.bfloat16)), _bits(fast))


# --- Triton (CUDA, or interpreted on the CPU) ----------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, blocksize", [((24, 256), 64), ((3001,), 128), ((5,), 32), ((2, 4096), 4096)])
def test_triton_is_bit_identical_to_reference(device, dtype, quant_type, double_quant, shape, blocksize):
    pytest.importorskip("triton")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is set only on machines without CUDA")
    torch.manual_seed(blocksize)
    w = (torch.randn(shape) * 3).to(dtype).to(device)
    w.view(-1)[:blocksize] = 0.0  # an all-zero block
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    ours = dequant_4bit.triton_dequantize(packed, state)
    reference = dequantize_4bit_reference(packed, state)
    assert ours.shape == w.shape and ours.dtype == dtype
    assert torch.equal(_bits(ours), _bits(reference))  # bits, sign of zero too


@pytest.mark.parametrize("device", devices())
def test_triton_bf16_rounding_is_to_nearest_even(device):
    pytest.importorskip("triton")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is set only on machines without CUDA")
    # code (+-1.0) * absmax lands exactly halfway between two bf16 numbers, with both parities;
    # truncation (TRITON_INTERPRET's own fp32->bf16 cast) would fail the first assert.
    absmax = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    w = torch.cat([torch.full((32,), -0.5), torch.tensor([1.0]), torch.zeros(31)])
    packed, state = quantize_4bit(w.to(device), 32, "nf4", double_quant=False)
    state.absmax = absmax.to(device)
    state.dtype = torch.bfloat16
    ours = dequant_4bit.triton_dequantize(packed, state).float().cpu()
    assert ours[32].item() == 1.0 + 4 * 2.0**-8  # 1 + 3/256 is a tie: rounds to the even 1 + 4/256
    assert ours[0].item() == -1.0  # -(1 + 1/256) is a tie: rounds to the even -1.0
    assert torch.equal(ours, dequantize_4bit_reference(packed, state).float().cpu())


@pytest.mark.parametrize("device", devices())
def test_dispatch_by_device(device):
    packed, state = quantize_4bit(_weight(1536, 576, torch.bfloat16, device), 64)
    expected = {"cuda": "triton", "cpu": "avx512" if AVX512 else "compiled_loop"}[device]
    if device == "cuda" and dequant_4bit.triton_machine() is not None:
        expected = "reference"
    assert _choice(packed, state, torch.bfloat16) == expected
    assert torch.equal(_bits(dequantize_4bit(packed, state)), _bits(dequantize_4bit_reference(packed, state)))
