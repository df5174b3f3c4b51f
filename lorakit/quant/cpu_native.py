"""The AVX-512 CPU dequantization kernel (csrc/dequant_4bit.cpp), built on first use.

The compiled torch.compile loop (cpu_dequant.py) does a gather from the 16-entry code per nibble;
this kernel does the lookup with one vector permute per 16 values and runs ~3x faster, which
matters because QLoRA dequantizes every base weight twice per training step. It is built with
torch.utils.cpp_extension (a C++ compiler and ninja; ~1 min once per machine, cached by torch),
used only on CPUs PyTorch reports as AVX-512 capable, and bit-identical to the reference (tests).
If the build fails for any reason lorakit keeps using the compiled loop.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from lorakit.compile import compile_enabled
from lorakit.quant.nf4 import QuantState

SOURCE = Path(__file__).parent / "csrc" / "dequant_4bit.cpp"
OUTPUT_DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def _module() -> ModuleType | None:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load("lorakit_dequant_4bit", [str(SOURCE)], verbose=False,
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-ffp-contract=off"])
    except Exception:  # no compiler, no ninja, a read-only cache...: the compiled loop still works
        return None


def available() -> bool:
    """True when the kernel is (or can be) built here and runtime compilation is allowed."""
    return compile_enabled() and _module() is not None


def usable(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> bool:
    """True when the kernel applies: CPU, fp32 code/absmax, whole blocks of a multiple of 32, bf16/fp32 out."""
    n = int(torch.Size(state.shape).numel())
    nested_ok = not state.nested or (state.state2.absmax.dtype == torch.float32 and state.absmax.dtype == torch.uint8)
    return (packed.device.type == "cpu" and dtype in OUTPUT_DTYPES and state.dtype in (torch.float32, dtype)
            and state.blocksize % 32 == 0 and n % state.blocksize == 0 and state.code.numel() == 16
            and nested_ok and available())


def dequantize_4bit_native(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize to `dtype` (bf16 or fp32) in one pass; same bits as the reference then `.to(dtype)`."""
    data = packed.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    code = state.code.float().reshape(-1).contiguous()
    if state.nested:
        s2 = state.state2
        out = _module().dequantize_4bit(data.contiguous(), code, state.absmax.contiguous(), s2.code.float(),
                                        s2.absmax.float().contiguous(), float(state.offset), state.blocksize,
                                        s2.blocksize, dtype == torch.bfloat16)
    else:
        out = _module().dequantize_4bit(data.contiguous(), code, state.absmax.float().contiguous(), None, None, 0.0,
                                        state.blocksize, 1, dtype == torch.bfloat16)
    return out.view(tuple(state.shape))
