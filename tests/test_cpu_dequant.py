"""The fused compiled CPU dequantization is bit-identical to the plain-PyTorch reference."""

import pytest
import torch

from lorakit.quant import cpu_dequant
from lorakit.quant.nf4 import dequantize_4bit, dequantize_4bit_reference, quantize_4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_fused_equals_reference(quant_type, double_quant, src_dtype, out_dtype):
    torch.manual_seed(0)
    w = (torch.randn(384, 512) * 0.02).to(src_dtype)
    w[3, :64] = 0  # an all-zero block
    w[7, 5] = 4.0  # an outlier
    packed, state = quantize_4bit(w, 64, quant_type, double_quant)
    assert cpu_dequant.usable(packed, state)
    fast = cpu_dequant.dequantize_4bit_cpu(packed, state, out_dtype)
    ref = dequantize_4bit_reference(packed, state).to(out_dtype)
    assert fast.dtype == out_dtype and fast.shape == w.shape
    assert torch.equal(fast.view(torch.int16 if out_dtype != torch.float32 else torch.int32),
                       ref.view(torch.int16 if out_dtype != torch.float32 else torch.int32))


def test_dispatch_uses_reference_for_small_or_partial_tensors():
    w = torch.randn(100, 3)  # 300 elements: not a whole number of blocks, and small
    packed, state = quantize_4bit(w, 64, "nf4", True)
    assert not cpu_dequant.usable(packed, state)
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit_reference(packed, state))
