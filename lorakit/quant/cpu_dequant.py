"""Fast CPU 4-bit dequantization: the reference math fused into one loop by torch.compile (inductor).

The reference (`nf4.dequantize_4bit_reference`) makes several passes over memory (byte lookup,
padding, absmax multiply, two dtype casts) and de-nests the absmax separately. Here the whole
expression — nested absmax, code lookup, scale, cast to the output dtype — is one fused
vectorized C++ loop. It computes the same fp32 products and one rounding, so its output is
bit-identical to the reference (tests hold it to that); it is used for large tensors only, where
the one-off compile (a few seconds per process) pays. On AVX-512 CPUs the hand-written kernel in
cpu_native.py (~3x faster) is used instead; this loop is the portable fast path.
"""

from __future__ import annotations

import functools

import torch

from lorakit.compile import compile_enabled, disable_compile, raise_recompile_limit
from lorakit.quant.nf4 import QuantState

MIN_ELEMENTS = 1 << 16  # below this the reference is already fast and compiling isn't worth it


def _code_values(data: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Two gathers from the 16-entry code (high nibble first) vectorize; one gather from a 256-entry
    # byte table does not, and runs ~5x slower.
    return torch.stack([code[(data >> 4).long()], code[(data & 15).long()]], dim=1).view(-1, blocksize)


def _fused_plain(data: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                 dtype: torch.dtype) -> torch.Tensor:
    values = _code_values(data, code, blocksize)  # n is a multiple of blocksize here
    return (values * absmax.view(-1, 1)).view(-1).to(dtype)


def _fused_nested(data: torch.Tensor, code: torch.Tensor, qabsmax: torch.Tensor, code2: torch.Tensor,
                  absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int, blocksize2: int,
                  dtype: torch.dtype) -> torch.Tensor:
    nblocks = qabsmax.numel()
    pad = -nblocks % blocksize2
    codes = torch.nn.functional.pad(qabsmax.long(), (0, pad))
    absmax = (code2[codes].view(-1, blocksize2) * absmax2.view(-1, 1)).view(-1)[:nblocks] + offset
    values = _code_values(data, code, blocksize)
    return (values * absmax.view(-1, 1)).view(-1).to(dtype)


@functools.cache
def _compiled(nested: bool, numel: int):
    # Static shapes: inductor's dynamic-shape version of this gather is ~20x slower.
    raise_recompile_limit()
    fn = _fused_nested if nested else _fused_plain
    return torch.compile(fn, dynamic=False, fullgraph=True)


def usable(packed: torch.Tensor, state: QuantState) -> bool:
    """True when the fused path applies: CPU, big enough, whole blocks, compiling not disabled."""
    n = state.shape.numel() if isinstance(state.shape, torch.Size) else int(torch.Size(state.shape).numel())
    return (compile_enabled() and packed.device.type == "cpu" and n >= MIN_ELEMENTS and n % state.blocksize == 0
            and (not state.nested or state.state2.absmax.dtype == torch.float32))


def dequantize_4bit_cpu(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize in one fused pass; bit-identical to the reference followed by `.to(dtype)`."""
    out_dtype = dtype or state.dtype
    if state.dtype not in (torch.float32, out_dtype):
        # The reference rounds to state.dtype first; a single rounding could differ, so keep two.
        return dequantize_4bit_cpu(packed, state).to(out_dtype)
    data = packed.reshape(-1)
    data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
    code = state.code.float().reshape(-1)
    try:
        if state.nested:
            s2 = state.state2
            out = _compiled(True, data.numel())(data, code, state.absmax, s2.code.float(), s2.absmax.float(),
                                  state.offset.float().reshape(()), state.blocksize, s2.blocksize, out_dtype)
        else:
            out = _compiled(False, data.numel())(data, code, state.absmax.float(), state.blocksize, out_dtype)
    except Exception:  # no C++ compiler, an unsupported platform...: the reference always works
        disable_compile()
        from lorakit.quant.nf4 import dequantize_4bit_reference

        return dequantize_4bit_reference(packed, state).to(out_dtype)
    return out.view(tuple(state.shape))
