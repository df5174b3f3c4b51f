"""The dynamic 8-bit map and blockwise 8-bit quantization (bitsandbytes-compatible).

Used for the double quantization of NF4 absmax values and for 8-bit optimizer states.
Quantization picks the exact nearest code: a scaled value exactly halfway between two codes
goes to the lower one. `bucketize` over the decision bounds is the reference; the fast path looks
the code up by the top 16 bits of the fp32 value (`nearest_code_table`) and settles the one bound
that can fall in that range with a compare, with the same result for every fp32 value.
bitsandbytes' CUDA kernel is exact nearest too; its 0.50 CPU kernel uses an approximate
65536-bin lookup table, so its codes can differ from ours by a step or two.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence

import torch

from lorakit.constants import CHUNK_ELEMS
from lorakit.errors import LorakitError


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic (exponent + fraction) map: 2**total_bits sorted fp32 values in [-1, 1]."""
    # Follows bitsandbytes.functional.create_dynamic_map step by step (fp32 linspace, fp32 means,
    # Python-float scale) so every value is bit-identical.
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits
        fraction_items = int(2**shift + 1 if signed else 2 ** (shift + 1) + 1)
        data += _scaled_means(fraction_items, 10 ** (-(max_exponent_bits - 1) + i), signed)
    if additional_items > 0:
        # bitsandbytes reuses the last loop exponent here (its loop variable leaks), i.e. scale 10**0.
        data += _scaled_means(additional_items + 1, 1.0, signed)
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise LorakitError(
            f"create_dynamic_map: signed={signed}, max_exponent_bits={max_exponent_bits} and "
            f"total_bits={total_bits} give {len(data)} values, not {2**total_bits}; "
            "use the defaults (True, 7, 8)"
        )
    # Like bitsandbytes, a map of fewer than 8 bits is padded with zeros to 256 entries.
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _scaled_means(items: int, scale: float, signed: bool) -> list[float]:
    """Midpoints of `items` fp32 points spaced over [0.1, 1], times scale (and negated when signed)."""
    boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    values = (scale * means).tolist()
    return values + (-scale * means).tolist() if signed else values


def nearest_code_bounds(code: torch.Tensor) -> torch.Tensor:
    """fp32 decision bounds for a sorted code: value > bounds[i] exactly when it is nearer code[i+1].

    The true midpoint of two fp32 codes is exact in fp64; rounding it *down* to fp32 gives the
    largest fp32 bound at or below it, so `bucketize(x, bounds)` (count of bounds < x) sends every
    fp32 x to its exact nearest code, ties to the lower one. fp32 midpoints would misplace values
    within half an ulp of a boundary.
    """
    code64 = code.detach().to(torch.float64)
    mids64 = (code64[:-1] + code64[1:]) / 2
    bounds = mids64.to(torch.float32)
    rounded_up = bounds.to(torch.float64) > mids64
    return torch.where(rounded_up, torch.nextafter(bounds, torch.full_like(bounds, -math.inf)), bounds)


def nearest_code_table(bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per top-16-bit prefix of an fp32 value: (count of bounds below that range, the next bound), or None.

    All fp32 values sharing their top 16 bits (sign, exponent, 7 mantissa bits) lie in one closed range
    [lo, hi]. When at most one bound falls in any finite range, the nearest code of x in a range is
    first + (x > next_bound), exactly `bucketize(x, bounds)`. A code denser than that (two bounds within
    2**-8 relative of each other; not the dynamic, linear or 4-bit maps) gets None: bucketize it.
    """
    keys = torch.arange(1 << 16, dtype=torch.int32)
    high = keys << 16  # the range's first bit pattern; prefixes >= 0x8000 are negative floats
    negative = keys >= 1 << 15
    lo = torch.where(negative, high | 0xFFFF, high).view(torch.float32)
    hi = torch.where(negative, high, high | 0xFFFF).view(torch.float32)
    bounds = bounds.detach().cpu()
    first = torch.bucketize(lo, bounds)  # bounds < lo
    last = torch.bucketize(hi, bounds, right=True)  # bounds <= hi
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    if bool(((last - first) > 1)[finite].any()) or bounds.numel() > 255:
        return None
    # Past the last bound the next one is +inf: no x is above it. NaN ranges keep bucketize's answer for NaN.
    next_bound = torch.cat([bounds, torch.full((1,), math.inf)])[first]
    return first.to(torch.uint8), next_bound


@functools.lru_cache(maxsize=8)
def _cached_table(code_bytes: bytes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    table = nearest_code_table(nearest_code_bounds(code))
    return None if table is None else (table[0].to(device), table[1].to(device))


def nearest_codes(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest code for each fp32 value (ties to the lower code); `bucketize` is the reference."""
    table = _cached_table(code.detach().cpu().contiguous().numpy().tobytes(), scaled.device)
    if table is None:
        return torch.bucketize(scaled, nearest_code_bounds(code.to(scaled.device)), out_int32=True).to(torch.uint8)
    first, next_bound = table
    # On a little-endian CPU the high half of each fp32 is its second uint16: a view instead of a shift pass
    # (uint16 has only basic kernels, so other devices shift).
    if sys.byteorder == "little" and scaled.device.type == "cpu":
        prefix = scaled.contiguous().view(torch.uint16)[1::2].int()
    else:
        prefix = scaled.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
    # index_select: on the CPU much faster than [] indexing for these gathers (most of all with a uint8 table).
    return first.index_select(0, prefix).add_(scaled > next_bound.index_select(0, prefix))


def _check_blockwise_args(x: torch.Tensor, code: torch.Tensor, blocksize: int, where: str) -> None:
    """Reject inputs quantize_blockwise/dequantize_blockwise cannot handle, naming the argument."""
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise LorakitError(f"{where}: blocksize must be a positive int, got {blocksize!r}")
    if code.dim() != 1 or code.dtype != torch.float32 or code.numel() < 2:
        raise LorakitError(f"{where}: code must be a 1-D float32 tensor of at least 2 values (e.g. "
                           f"create_dynamic_map()), got {code.dtype} of shape {tuple(code.shape)}")
    if x.numel() == 0:
        raise LorakitError(f"{where}: the input tensor is empty; pass at least one element")


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x to 8-bit indices into a sorted `code`, one fp32 absmax per block of the flattened x.

    Returns (flat uint8 codes with x.numel() entries, fp32 absmax of shape [ceil(n / blocksize)]).
    An all-zero block gets absmax 0 and the code nearest 0.0, never NaN.
    """
    _check_blockwise_args(x, code, blocksize, "quantize_blockwise")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LorakitError(f"quantize_blockwise: expected a float32/float16/bfloat16 tensor, got {x.dtype}")
    if code.numel() > 256:
        raise LorakitError(
            f"quantize_blockwise: code has {code.numel()} values; an 8-bit code has at most 256"
        )
    flat = x.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    chunk = max(blocksize, CHUNK_ELEMS // blocksize * blocksize)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        first_block = start // blocksize
        values = flat[start:stop].float()
        pad = -(stop - start) % blocksize
        blocks = (torch.nn.functional.pad(values, (0, pad)) if pad else values).view(-1, blocksize)
        block_absmax = blocks.abs().amax(dim=1)
        absmax[first_block:first_block + blocks.shape[0]] = block_absmax
        # clamp(min=1e-38) keeps an all-zero block at 0 * 1e38 = 0 instead of 0 * inf = NaN.
        scaled = (blocks * (1.0 / block_absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
        codes[start:stop] = nearest_codes(scaled.view(-1)[: stop - start], code)
    return codes, absmax


def dequantize_blockwise(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """code[q] * absmax[block] in fp32, cast to dtype and reshaped to shape."""
    _check_blockwise_args(q, code, blocksize, "dequantize_blockwise")
    n = q.numel()
    if q.dtype != torch.uint8:
        raise LorakitError(f"dequantize_blockwise: q must be uint8 codes, got {q.dtype}")
    if math.prod(shape) != n:
        raise LorakitError(f"dequantize_blockwise: shape {tuple(shape)} has {math.prod(shape)} elements "
                           f"but q has {n}; pass the shape of the tensor that was quantized")
    if absmax.numel() != -(-n // blocksize):
        raise LorakitError(f"dequantize_blockwise: {n} codes in blocks of {blocksize} need "
                           f"{-(-n // blocksize)} absmax values, got {absmax.numel()}")
    pad = -n % blocksize
    values = code.to(q.device).index_select(0, torch.nn.functional.pad(q.reshape(-1).int(), (0, pad)))
    out = values.view(-1, blocksize) * absmax.float().view(-1, 1)
    return out.view(-1)[:n].to(dtype).reshape(tuple(shape))
