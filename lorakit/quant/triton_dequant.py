"""Triton NF4/FP4 dequantization kernel, bit-identical to `nf4.dequantize_4bit_reference`.

Each program reads a tile of packed bytes and writes the two values of each byte (high nibble
first) as one contiguous, coalesced run: code[nibble] * absmax[block] in fp32, then one cast to
the output dtype (round to nearest even), exactly the reference's arithmetic. A nested absmax is
de-nested with torch first (one tiny kernel over nblocks values), so the kernel only sees fp32.
triton is imported lazily: this module imports (and the reference works) without it.
"""

from __future__ import annotations

import functools
import math

import torch

from lorakit.quant.nf4 import QuantState, _as_bytes, _check_dequant_args

_BYTES_PER_PROGRAM = 1024


@functools.cache
def _kernel():
    """Build (once) and return the jitted kernel; raises ImportError when triton is missing."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, n_out,
                            BLOCKSIZE: tl.constexpr, TILE: tl.constexpr, OUT_BF16: tl.constexpr):
        pid = tl.program_id(0)
        byte_offs = pid * TILE + tl.arange(0, TILE)
        byte = tl.load(packed_ptr + byte_offs, mask=byte_offs < n_bytes, other=0).to(tl.int32)
        # Both values of a byte share a block: blocksize is even and bytes start at even elements.
        scale = tl.load(absmax_ptr + (byte_offs * 2) // BLOCKSIZE, mask=byte_offs < n_bytes, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 0xF)) * scale
        # [v0_hi, v0_lo, v1_hi, ...] = element order. (tl.interleave does the same, but it is a @jit
        # helper, which breaks TRITON_INTERPRET when triton was imported before the env var was set.)
        values = tl.reshape(tl.join(hi, lo), [2 * TILE])
        out_offs = pid * (2 * TILE) + tl.arange(0, 2 * TILE)
        if OUT_BF16:
            # fp32 -> bf16 round-to-nearest-even on the bit pattern. The GPU's cvt.rn does the same, but
            # TRITON_INTERPRET's fp32->bf16 cast truncates; this way both paths match torch's .to(bf16).
            # (Exact for finite values and inf; code * absmax is never a signalling NaN.)
            bits = values.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            out_values = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out_values = values.to(out_ptr.dtype.element_ty)  # fp16: round to nearest even
        tl.store(out_ptr + out_offs, out_values, mask=out_offs < n_out)

    return triton, dequant_4bit_kernel


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Dequantize with the Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1), as the reference."""
    _check_dequant_args(packed, state, "dequantize_4bit_triton")
    triton, kernel = _kernel()
    data = _as_bytes(packed).contiguous()
    absmax = state.absmax_fp32().contiguous()
    code = state.code.to(device=data.device, dtype=torch.float32).contiguous()
    n_out = math.prod(state.shape)
    out = torch.empty(n_out, dtype=state.dtype, device=data.device)
    grid = (triton.cdiv(data.numel(), _BYTES_PER_PROGRAM),)
    kernel[grid](data, absmax, code, out, data.numel(), n_out,
                 BLOCKSIZE=state.blocksize, TILE=_BYTES_PER_PROGRAM, OUT_BF16=state.dtype == torch.bfloat16)
    return out.view(state.shape)
