"""4-bit (NF4/FP4) dequantization: the reference and three fast kernels, all bit-identical to it.

Every implementation computes code_fp32[nibble] * absmax_fp32[block] and rounds once to the output
dtype (a state in another half dtype rounds twice, as the reference followed by `.to(dtype)` does).
- `triton`: CUDA tensors; one program per tile of packed bytes, coalesced writes.
- `avx512`: csrc/dequant_4bit.cpp, the code lookup as one vector permute per 16 values; built on
  first use with torch.utils.cpp_extension (a C++ compiler and ninja, cached by torch).
- `compiled_loop`: the reference's expression fused into one loop by torch.compile; the portable
  CPU path. Both CPU kernels are for large tensors only, where the one-off build pays.
- `reference`: plain PyTorch, chunked so its fp32 temporaries stay small.
The state is anything with QuantState's fields (this layer does not import lorakit.quant).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch

from lorakit.constants import CHUNK_ELEMS  # elements per step of the reference: bounds its fp32 temporaries
from lorakit.kernels.compile import compile_machine_check, compiled, dispatch_mode_check
from lorakit.kernels.dispatch import Kernel, call, register

OP = "dequantize_4bit"
MIN_ELEMENTS = 1 << 16  # below this the reference is already fast and building a kernel isn't worth it
SOURCE = Path(__file__).parent / "csrc" / "dequant_4bit.cpp"
AVX512_OUTPUT_DTYPES = (torch.bfloat16, torch.float32)
TRITON_BYTES_PER_PROGRAM = 1024


class BlockState(Protocol):
    """The fields of lorakit.quant.QuantState that dequantization reads."""

    absmax: torch.Tensor
    shape: Any
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    offset: torch.Tensor | None
    state2: Any

    @property
    def nested(self) -> bool: ...

    def absmax_fp32(self) -> torch.Tensor: ...


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed storage as a flat uint8 tensor (bitsandbytes allows other quant_storage dtypes)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _numel(state: BlockState) -> int:
    return math.prod(state.shape)


def _byte_lut(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] fp32: byte -> (code of its high nibble, code of its low nibble)."""
    code = code.float().reshape(-1)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def dequantize_reference(packed: torch.Tensor, state: BlockState) -> torch.Tensor:
    """Plain PyTorch: code[idx] * absmax[block] in fp32, one cast to state.dtype."""
    data = as_bytes(packed)
    absmax = state.absmax_fp32()
    lut = _byte_lut(state.code.to(data.device))
    n = _numel(state)
    bs = state.blocksize
    out = torch.empty(n, dtype=state.dtype, device=data.device)
    chunk = max(bs, CHUNK_ELEMS // bs * bs)  # elements; a multiple of bs, so chunks start on a block
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        byte_idx = data[start // 2: (stop + 1) // 2].int()  # index_select beats lut[idx] on the CPU
        values = torch.index_select(lut, 0, byte_idx).view(-1)  # fp32, 2 per byte
        values = torch.nn.functional.pad(values, (0, -values.numel() % bs)).view(-1, bs)
        block_absmax = absmax[start // bs: start // bs + values.shape[0]]
        out[start:stop] = values.mul_(block_absmax.unsqueeze(1)).view(-1)[: stop - start]
    return out.view(state.shape)


def reference(packed: torch.Tensor, state: BlockState, dtype: torch.dtype) -> torch.Tensor:
    """The reference in state.dtype, then cast to `dtype`."""
    return dequantize_reference(packed, state).to(dtype)


# --- compiled loop -------------------------------------------------------------------------------

def _code_values(data: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Two gathers from the 16-entry code (high nibble first) vectorize; one from a 256-entry table does not.
    return torch.stack([code[(data >> 4).long()], code[(data & 15).long()]], dim=1).view(-1, blocksize)


def _loop_plain(data, code, absmax, blocksize, dtype):
    values = _code_values(data, code, blocksize)  # n is a multiple of blocksize here
    return (values * absmax.view(-1, 1)).view(-1).to(dtype)


def _loop_nested(data, code, qabsmax, code2, absmax2, offset, blocksize, blocksize2, dtype):
    nblocks = qabsmax.numel()
    codes = torch.nn.functional.pad(qabsmax.long(), (0, -nblocks % blocksize2))
    absmax = (code2[codes].view(-1, blocksize2) * absmax2.view(-1, 1)).view(-1)[:nblocks] + offset
    values = _code_values(data, code, blocksize)
    return (values * absmax.view(-1, 1)).view(-1).to(dtype)


@functools.cache
def _loop(nested: bool, numel: int):
    # Static shapes, one compiled function per size: inductor's dynamic-shape gather is far slower.
    return compiled(_loop_nested if nested else _loop_plain, dynamic=False)


def compiled_loop(packed: torch.Tensor, state: BlockState, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize in one fused torch.compile loop."""
    if state.dtype not in (torch.float32, dtype):
        # The reference rounds to state.dtype first; a single rounding could differ, so keep two.
        return compiled_loop(packed, state, state.dtype).to(dtype)
    data = as_bytes(packed)
    code = state.code.float().reshape(-1)
    if state.nested:
        s2 = state.state2
        out = _loop(True, data.numel())(data, code, state.absmax, s2.code.float(), s2.absmax.float(),
                                        state.offset.float().reshape(()), state.blocksize, s2.blocksize, dtype)
    else:
        out = _loop(False, data.numel())(data, code, state.absmax.float(), state.blocksize, dtype)
    return out.view(tuple(state.shape))


def _cpu_large(packed: torch.Tensor, state: BlockState) -> str | None:
    if packed.device.type != "cpu":
        return "not a CPU tensor"
    n = _numel(state)
    if n < MIN_ELEMENTS:
        return f"{n} elements, fewer than {MIN_ELEMENTS}"
    if n % state.blocksize:
        return "a partial last block"
    return dispatch_mode_check()


def _loop_accepts(packed: torch.Tensor, state: BlockState, dtype: torch.dtype) -> str | None:
    if state.nested and state.state2.absmax.dtype != torch.float32:
        return "nested absmax not fp32"
    return _cpu_large(packed, state)


# --- AVX-512 C++ kernel --------------------------------------------------------------------------

@functools.cache
def _extension() -> ModuleType | str:
    """The built extension, or why it is not there."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"the CPU reports {capability}, not AVX512"
    try:
        from torch.utils.cpp_extension import load

        return load("lorakit_dequant_4bit", [str(SOURCE)], verbose=False,
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-ffp-contract=off"])
    except Exception as exc:  # no compiler, no ninja, a read-only cache...: the compiled loop still works
        return f"building {SOURCE.name} failed ({type(exc).__name__})"


def _avx512_machine() -> str | None:
    reason = compile_machine_check()
    if reason:
        return reason
    built = _extension()
    return built if isinstance(built, str) else None


def _avx512_accepts(packed: torch.Tensor, state: BlockState, dtype: torch.dtype) -> str | None:
    if dtype not in AVX512_OUTPUT_DTYPES or state.dtype not in (torch.float32, dtype):
        return f"output {dtype} from a {state.dtype} state"
    if state.blocksize % 32 or state.code.numel() != 16:
        return "blocksize not a multiple of 32 or not a 16-entry code"
    if state.nested and (state.state2.absmax.dtype != torch.float32 or state.absmax.dtype != torch.uint8):
        return "nested absmax not uint8 codes with fp32 scales"
    return _cpu_large(packed, state)


def avx512(packed: torch.Tensor, state: BlockState, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize with the AVX-512 kernel (bf16 or fp32 out)."""
    data = as_bytes(packed).contiguous()
    code = state.code.float().reshape(-1).contiguous()
    module = _extension()
    if state.nested:
        s2 = state.state2
        out = module.dequantize_4bit(data, code, state.absmax.contiguous(), s2.code.float(),
                                     s2.absmax.float().contiguous(), float(state.offset), state.blocksize,
                                     s2.blocksize, dtype == torch.bfloat16)
    else:
        out = module.dequantize_4bit(data, code, state.absmax.float().contiguous(), None, None, 0.0,
                                     state.blocksize, 1, dtype == torch.bfloat16)
    return out.view(tuple(state.shape))


# --- Triton --------------------------------------------------------------------------------------

@functools.cache
def _triton_kernel():
    """Build (once) and return (triton, the jitted kernel); raises ImportError when triton is missing."""
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
        # [v0_hi, v0_lo, v1_hi, ...] = element order. (tl.interleave is a @jit helper, which breaks
        # TRITON_INTERPRET when triton was imported before the variable was set.)
        values = tl.reshape(tl.join(hi, lo), [2 * TILE])
        out_offs = pid * (2 * TILE) + tl.arange(0, 2 * TILE)
        if OUT_BF16:
            # Round to nearest even on the bit pattern: TRITON_INTERPRET's fp32->bf16 cast truncates,
            # the GPU's cvt.rn does not; this way both match torch's .to(bf16). Exact for finite values.
            bits = values.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            out_values = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out_values = values.to(out_ptr.dtype.element_ty)  # fp16: round to nearest even
        tl.store(out_ptr + out_offs, out_values, mask=out_offs < n_out)

    return triton, dequant_4bit_kernel


def triton_dequantize(packed: torch.Tensor, state: BlockState) -> torch.Tensor:
    """Dequantize with the Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1) to state.dtype."""
    triton, kernel = _triton_kernel()
    data = as_bytes(packed).contiguous()
    absmax = state.absmax_fp32().contiguous()
    code = state.code.to(device=data.device, dtype=torch.float32).contiguous()
    n_out = _numel(state)
    out = torch.empty(n_out, dtype=state.dtype, device=data.device)
    grid = (triton.cdiv(data.numel(), TRITON_BYTES_PER_PROGRAM),)
    kernel[grid](data, absmax, code, out, data.numel(), n_out,
                 BLOCKSIZE=state.blocksize, TILE=TRITON_BYTES_PER_PROGRAM, OUT_BF16=state.dtype == torch.bfloat16)
    return out.view(state.shape)


def _triton(packed: torch.Tensor, state: BlockState, dtype: torch.dtype) -> torch.Tensor:
    return triton_dequantize(packed, state).to(dtype)


@functools.cache
def triton_machine() -> str | None:
    """Why Triton kernels cannot run here (None when triton imports)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install lorakit[triton])"
    return None


def _cuda_only(packed: torch.Tensor, *args: Any) -> str | None:
    return None if packed.is_cuda else "not a CUDA tensor"


register(OP, [
    Kernel("triton", _triton, triton_machine, _cuda_only),
    Kernel("avx512", avx512, _avx512_machine, _avx512_accepts),
    Kernel("compiled_loop", compiled_loop, compile_machine_check, _loop_accepts),
    Kernel("reference", reference),
])


def dequantize_4bit(packed: torch.Tensor, state: BlockState, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize to state.shape in `dtype` with the first implementation that applies."""
    return call(OP, packed, state, dtype)
