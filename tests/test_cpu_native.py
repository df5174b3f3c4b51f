"""The AVX-512 CPU dequantization kernel is bit-identical to the plain-PyTorch reference."""

import pytest
import torch

from lorakit.quant import cpu_native
from lorakit.quant.nf4 import dequantize_4bit, dequantize_4bit_reference, quantize_4bit

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
needs_kernel = pytest.mark.skipif(not AVX512, reason="the kernel is built only for AVX-512 CPUs")


def _weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    w[3, :64] = 0  # an all-zero block
    w[7, 5] = 4.0  # an outlier
    return w.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@needs_kernel
def test_builds_on_an_avx512_cpu():
    assert cpu_native.available()  # a failed build would silently cost QLoRA its fast path


@needs_kernel
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
def test_equals_reference(quant_type, double_quant, blocksize, src_dtype, out_dtype):
    w = _weight(384, 512, src_dtype)
    packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
    assert cpu_native.usable(packed, state, out_dtype)
    fast = cpu_native.dequantize_4bit_native(packed, state, out_dtype)
    ref = dequantize_4bit_reference(packed, state).to(out_dtype)
    assert fast.dtype == out_dtype and fast.shape == w.shape
    assert torch.equal(_bits(fast), _bits(ref))


@needs_kernel
def test_dequantize_4bit_takes_it_for_large_cpu_tensors_with_the_same_bits():
    w = _weight(1536, 576, torch.bfloat16)  # SmolLM2's gate/up shape
    packed, state = quantize_4bit(w, 64, "nf4", True)
    out = dequantize_4bit(packed, state, torch.bfloat16)
    assert torch.equal(_bits(out), _bits(dequantize_4bit_reference(packed, state)))


def test_not_usable_where_one_rounding_would_differ_or_blocks_do_not_fit():
    w = _weight(256, 256, torch.bfloat16)
    packed, state = quantize_4bit(w, 64, "nf4", True)
    # bf16 weights to fp32: the reference rounds to bf16 first; fp16 output is not built
    assert not cpu_native.usable(packed, state, torch.float32)
    assert not cpu_native.usable(packed, state, torch.float16)
    odd = quantize_4bit(torch.randn(100, 3), 64, "nf4", True)  # 300 elements: a partial block
    assert not cpu_native.usable(*odd, torch.float32)
