"""NF4/FP4 blockwise 4-bit quantization, bit-identical to bitsandbytes 0.50 (CPU backend).

The rules, from bitsandbytes' `backends/default/ops.py`:
- blocks of `blocksize` run over the flattened row-major tensor; the last one may be partial;
- absmax = max|x| per block in fp32 (an all-zero block stores 0, a partial one at least 1e-38);
- scaled = clamp(x * (1/absmax), -1, 1) in fp32, except the partial last block divides x / absmax;
- the code index is `bucketize(scaled, fp32 midpoints of the sorted code)`: an exact tie goes to the
  lower code; FP4 is bucketized in sorted order and mapped back to its bit-pattern index;
- two codes per byte, the first (even) element in the high nibble; an odd n is padded with the
  code of 0.0;
- dequant: code_fp32[idx] * absmax_fp32[block], then one cast to the output dtype.
Double quantization stores the absmax as 8-bit codes: quantize_blockwise(absmax - mean, dynamic map, 256).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from lorakit.constants import ALLOWED_BLOCKSIZES, DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE
from lorakit.constants import CHUNK_ELEMS as _CHUNK_ELEMS  # a module attribute, so a test can shrink it
from lorakit.errors import LorakitError
from lorakit.kernels import dequant_4bit as dequant_kernels
from lorakit.quant.blockwise8 import create_dynamic_map, dequantize_blockwise, quantize_blockwise

# Index -> value, fp32. NF4 is sorted ascending with 0.0 at index 7.
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit): the index is the bit pattern, so index 8 is -0.0.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / 12.0

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantState:
    """What dequantization needs besides the packed bytes (bitsandbytes' QuantState fields)."""

    absmax: torch.Tensor  # fp32 [nblocks], or uint8 [nblocks] codes when nested
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str  # "nf4" | "fp4"; "dynamic" for the nested 8-bit state2
    code: torch.Tensor  # 16 fp32 values (256 for state2)
    offset: torch.Tensor | None = None  # fp32 scalar mean of the absmax, nested only
    state2: QuantState | None = None  # 8-bit state of the absmax codes, nested only

    @property
    def nested(self) -> bool:
        """True when the absmax is double-quantized."""
        return self.state2 is not None

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on `device`."""
        return dataclasses.replace(
            self,
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            state2=None if self.state2 is None else self.state2.to(device),
        )

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 absmax, de-nested when double-quantized."""
        if not self.nested:
            return self.absmax.float()
        s2 = self.state2
        absmax = dequantize_blockwise(self.absmax, s2.absmax, s2.code, s2.blocksize, self.absmax.shape)
        return absmax + self.offset.float()

    def nbytes(self) -> int:
        """Bytes held by all tensors of this state (and its nested state)."""
        tensors = [self.absmax, self.code] + ([] if self.offset is None else [self.offset])
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + (0 if self.state2 is None else self.state2.nbytes())


def _check_blocksize(blocksize: int, where: str) -> None:
    """Raise unless blocksize is one bitsandbytes allows for 4-bit."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in ALLOWED_BLOCKSIZES:
        raise LorakitError(
            f"{where}: blocksize {blocksize!r} is not allowed; use one of {ALLOWED_BLOCKSIZES}"
        )


def _check_quant_type(quant_type: str, where: str) -> None:
    """Raise unless quant_type is nf4 or fp4."""
    if quant_type not in _CODES:
        raise LorakitError(f"{where}: unknown quant_type {quant_type!r}; use 'nf4' or 'fp4'")


@functools.cache
def _quantize_bounds(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 midpoints of the sorted code, and sorted position -> code index (uint8)."""
    code = _CODES[quant_type].to(device)
    # Stable sort puts +0.0 (index 0) before -0.0 (index 8), as bitsandbytes' argsort does: tiny
    # negatives and exact zeros get FP4 code 0, tiny positives code 8 (-0.0).
    order = torch.argsort(code, stable=True)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return mids, order.to(torch.uint8)


def _codes_to_packed(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest code (ties low) of each fp32 value in [-1, 1], two per byte, first in the high nibble."""
    mids, order = _quantize_bounds(quant_type, scaled.device)
    idx = torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)
    if quant_type != "nf4":
        idx = order[idx.long()]
    pairs = idx.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_4bit(
    w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, quant_type: str = "nf4", double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization of a 1-D or 2-D float tensor, bit-identical to bitsandbytes.

    Returns (packed uint8 of shape [(n + 1) // 2, 1], QuantState). With double_quant the absmax is
    stored as 8-bit codes of (absmax - mean) with the signed dynamic map, blocks of 256.
    """
    _check_blocksize(blocksize, "quantize_4bit")
    _check_quant_type(quant_type, "quantize_4bit")
    _check_float_tensor(w, "quantize_4bit")
    if w.dim() > 2:
        raise LorakitError(
            f"quantize_4bit: got a {w.dim()}-D tensor of shape {tuple(w.shape)}; weights must be 1-D or 2-D. "
            "Reshape it yourself (e.g. w.reshape(w.shape[0], -1)) so the block layout is your explicit choice"
        )
    flat = w.detach().reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    chunk = max(blocksize, _CHUNK_ELEMS // blocksize * blocksize)
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        blocks = flat[start:stop].float().view(-1, blocksize)
        lo, hi = torch.aminmax(blocks, dim=1)
        # max|x| without a full |x| temporary; abs() on both keeps an all-zero block at +0.0, not -0.0
        block_absmax = torch.maximum(lo.abs(), hi.abs())
        absmax[start // blocksize: stop // blocksize] = block_absmax
        # bitsandbytes multiplies by the fp32 reciprocal; clamp keeps an all-zero block at 0, not NaN.
        scaled = torch.mul(blocks, (1.0 / block_absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
        packed[start // 2: stop // 2] = _codes_to_packed(scaled.view(-1), quant_type)
    if full < n:
        # The partial last block: bitsandbytes divides here and stores the clamped absmax.
        tail = flat[full:].float()
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = tail_absmax
        scaled = torch.clamp(tail / tail_absmax, -1, 1)
        scaled = torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))  # odd n: pad with 0.0
        packed[full // 2:] = _codes_to_packed(scaled, quant_type)
    code = _CODES[quant_type].to(flat.device)
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code)
    if double_quant:
        state = _nest(state)
    return packed.unsqueeze(1), state


def _nest(state: QuantState) -> QuantState:
    """Double quantization: the fp32 absmax becomes 8-bit codes of (absmax - mean)."""
    offset = state.absmax.mean()
    dynamic_map = create_dynamic_map(signed=True).to(state.absmax.device)
    qabsmax, absmax2 = quantize_blockwise(state.absmax - offset, dynamic_map, NESTED_BLOCKSIZE)
    state2 = QuantState(absmax=absmax2, shape=state.absmax.shape, dtype=torch.float32,
                        blocksize=NESTED_BLOCKSIZE, quant_type="dynamic", code=dynamic_map)
    return dataclasses.replace(state, absmax=qabsmax, offset=offset, state2=state2)


def _check_float_tensor(w: torch.Tensor, where: str) -> None:
    """Raise unless w is a non-empty fp32/fp16/bf16 tensor."""
    if not isinstance(w, torch.Tensor):
        raise LorakitError(f"{where}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise LorakitError(f"{where}: expected a float32/float16/bfloat16 tensor, got {w.dtype}; "
                           "integer and bool tensors cannot be quantized")
    if w.numel() == 0:
        raise LorakitError(f"{where}: the tensor of shape {tuple(w.shape)} is empty; nothing to quantize")


def _check_dequant_args(packed: torch.Tensor, state: QuantState, where: str) -> None:
    """Raise unless packed and state describe a consistent 4-bit tensor."""
    _check_blocksize(state.blocksize, where)
    _check_quant_type(state.quant_type, where)
    if state.dtype not in _FLOAT_DTYPES:
        raise LorakitError(f"{where}: state.dtype must be float32/float16/bfloat16, got {state.dtype}")
    n = math.prod(state.shape)
    nbytes = packed.numel() * packed.element_size()
    if n == 0 or nbytes != (n + 1) // 2:
        raise LorakitError(
            f"{where}: packed holds {nbytes} bytes but state.shape {tuple(state.shape)} needs "
            f"{(n + 1) // 2}; pass the packed tensor quantize_4bit returned together with its state"
        )
    if state.absmax.numel() != -(-n // state.blocksize):
        raise LorakitError(f"{where}: state.absmax has {state.absmax.numel()} values but {n} elements in "
                           f"blocks of {state.blocksize} need {-(-n // state.blocksize)}")


def dequantize_4bit_reference(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Pure-PyTorch dequantization: code[idx] * absmax[block] in fp32, one cast to state.dtype."""
    _check_dequant_args(packed, state, "dequantize_4bit")
    return dequant_kernels.dequantize_reference(packed, state)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to state.shape, in state.dtype (or `dtype`: as if cast after); every kernel gives the same bits."""
    _check_dequant_args(packed, state, "dequantize_4bit")
    return dequant_kernels.dequantize_4bit(packed, state, dtype or state.dtype)
