"""Dynamic 8-bit map and blockwise 8-bit quantization, against bitsandbytes 0.50.2 on the CPU."""

import bitsandbytes.functional as bnbF
import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.quant.blockwise8 import (
    create_dynamic_map,
    dequantize_blockwise,
    nearest_code_bounds,
    nearest_code_table,
    nearest_codes,
    quantize_blockwise,
)
from lorakit.quant.nf4 import NF4_CODE


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 values as their int32 bit patterns, so -0.0 != 0.0 and comparisons are bit-exact."""
    return t.contiguous().view(torch.int32)


def argmin_nearest(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Straightforward reference: the same fp32 scaling, then argmin |scaled - code| in fp64 (ties low)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).view(-1)[: flat.numel()]
    dist = (scaled.double().unsqueeze(1) - code.double().unsqueeze(0)).abs()
    return dist.argmin(dim=1).to(torch.uint8)  # argmin returns the first (lowest) index on ties


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(bits(ours), bits(bnbF.create_dynamic_map(signed=signed)))
    assert torch.all(ours[1:] > ours[:-1])  # sorted, no duplicates
    if signed:
        assert ours[127].item() == 0.0 and ours[0].item() == pytest.approx(-0.992968738079071, abs=0)
    else:
        assert ours[0].item() == 0.0 and ours[-1].item() == 1.0


def test_dynamic_map_other_widths_equal_bitsandbytes():
    ours = create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=6)
    assert torch.equal(bits(ours), bits(bnbF.create_dynamic_map(True, 3, 6)))


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_is_exact_nearest(blocksize, dtype):
    torch.manual_seed(blocksize)
    n = 3 * blocksize + 77
    x = torch.randn(n, dtype=dtype) * torch.logspace(-4, 1, n).to(dtype)  # values spanning 5 decades
    code = create_dynamic_map()
    q, absmax = quantize_blockwise(x, code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == (x.numel(),)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // blocksize),)
    assert torch.equal(q, argmin_nearest(x, code, blocksize))
    expected_absmax = torch.nn.functional.pad(x.float().abs(), (0, -x.numel() % blocksize)).view(-1, blocksize)
    assert torch.equal(absmax, expected_absmax.amax(dim=1))


@pytest.mark.parametrize("signed", [True, False])
def test_exact_midpoints_go_to_the_lower_code(signed):
    code = create_dynamic_map(signed=signed)
    mids64 = (code[:-1].double() + code[1:].double()) / 2
    representable = mids64.float().double() == mids64  # midpoints that are exact fp32 values
    mids = mids64[representable].float()
    assert mids.numel() > 100
    x = torch.cat([torch.ones(1), mids])  # absmax 1.0, so scaled == x exactly
    q, _ = quantize_blockwise(x, code, x.numel())
    lower = torch.nonzero(representable).view(-1).to(torch.uint8)
    assert torch.equal(q[1:], lower)


def test_values_within_half_an_ulp_of_a_boundary_round_to_the_nearest():
    # fp32 midpoints of two codes can round up past the true midpoint; values in that sliver
    # must still go to the nearer (lower) code.
    code = create_dynamic_map()
    mids64 = (code[:-1].double() + code[1:].double()) / 2
    rounded_up = mids64.float().double() > mids64
    above = mids64[rounded_up].float()  # the fp32 midpoint, above the true one
    below = torch.nextafter(above, torch.full_like(above, -2.0))  # largest fp32 below the true midpoint
    assert below.numel() > 10
    x = torch.cat([torch.ones(1), below, above])
    q, _ = quantize_blockwise(x, code, x.numel())
    assert torch.equal(q, argmin_nearest(x, code, x.numel()))


def test_all_zero_blocks_give_zero_not_nan():
    x = torch.zeros(3 * 256 + 5)
    x[300] = 2.0
    code = create_dynamic_map()
    q, absmax = quantize_blockwise(x, code, 256)
    assert absmax.tolist() == [0.0, 2.0, 0.0, 0.0]
    assert torch.all(code[q.long()][x == 0] == 0.0)
    out = dequantize_blockwise(q, absmax, code, 256, x.shape)
    assert not torch.isnan(out).any()
    assert torch.equal(out, x)


@pytest.mark.parametrize("blocksize", [256, 4096])
def test_agrees_with_bitsandbytes_cpu_lut(blocksize):
    # bnb 0.50's CPU kernel finds codes through an approximate 65536-bin LUT: ~0.15% of its codes
    # are off by a step or more, always in the direction of a larger error. Ours is exact nearest.
    torch.manual_seed(0)
    x = torch.randn(200_003)
    code = create_dynamic_map()
    q, absmax = quantize_blockwise(x, code, blocksize)
    q_bnb, state = bnbF.quantize_blockwise(x, code=code, blocksize=blocksize)
    assert torch.equal(absmax, state.absmax)
    same = (q == q_bnb.view(-1)).float().mean().item()
    assert same >= 0.995
    ours = dequantize_blockwise(q, absmax, code, blocksize, x.shape)
    theirs = bnbF.dequantize_blockwise(q_bnb, state)
    assert torch.all((ours - x).abs() <= (theirs - x).abs() + 1e-7 * x.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_bitsandbytes(dtype):
    torch.manual_seed(1)
    x = torch.randn(4096 * 3)
    code = create_dynamic_map()
    q_bnb, state = bnbF.quantize_blockwise(x, code=code, blocksize=4096)
    theirs = bnbF.dequantize_blockwise(q_bnb, state).to(dtype)
    ours = dequantize_blockwise(q_bnb.view(-1), state.absmax, code, 4096, x.shape, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, theirs)


def test_dequantize_reshapes():
    x = torch.randn(6, 100)
    code = create_dynamic_map()
    q, absmax = quantize_blockwise(x, code, 64)
    out = dequantize_blockwise(q, absmax, code, 64, (6, 100))
    assert out.shape == (6, 100)
    assert (out - x).abs().max().item() <= 0.02 * x.abs().max().item()


def test_bad_inputs_raise():
    code = create_dynamic_map()
    with pytest.raises(LorakitError, match="blocksize"):
        quantize_blockwise(torch.randn(10), code, 0)
    with pytest.raises(LorakitError, match="empty"):
        quantize_blockwise(torch.randn(0), code, 64)
    with pytest.raises(LorakitError, match="float32/float16/bfloat16"):
        quantize_blockwise(torch.ones(10, dtype=torch.int32), code, 64)
    with pytest.raises(LorakitError, match="absmax"):
        dequantize_blockwise(torch.zeros(100, dtype=torch.uint8), torch.ones(1), code, 64, (100,))
    with pytest.raises(LorakitError, match="shape"):
        dequantize_blockwise(torch.zeros(100, dtype=torch.uint8), torch.ones(2), code, 64, (10, 11))


def _edge_values(bounds: torch.Tensor) -> torch.Tensor:
    """Each 16-bit prefix range's two ends, every bound and its fp32 neighbours, random values; all in [-1, 1]."""
    keys = torch.arange(1 << 16, dtype=torch.int32) << 16
    ends = torch.cat([keys, keys | 0xFFFF]).view(torch.float32)
    near = torch.cat([bounds, torch.nextafter(bounds, torch.full_like(bounds, 2.0)),
                      torch.nextafter(bounds, torch.full_like(bounds, -2.0))])
    x = torch.cat([ends, near, torch.rand(100_000) * 2 - 1, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    return x[torch.isfinite(x) & (x.abs() <= 1)]


@pytest.mark.parametrize("name", ["dynamic signed", "dynamic unsigned", "linear 255", "nf4"])
def test_nearest_codes_table_equals_bucketize(name):
    code = {"dynamic signed": create_dynamic_map(signed=True), "dynamic unsigned": create_dynamic_map(signed=False),
            "linear 255": torch.linspace(-1, 1, 255), "nf4": NF4_CODE}[name]
    bounds = nearest_code_bounds(code)
    assert nearest_code_table(bounds) is not None  # these codes take the table path
    x = _edge_values(bounds)
    assert x.numel() > 100_000
    expected = torch.bucketize(x, bounds).to(torch.uint8)
    assert torch.equal(nearest_codes(x, code), expected)


def test_dense_code_falls_back_to_bucketize():
    # 256 codes within 1% of each other: several bounds share one 16-bit prefix range, so no table.
    code = torch.linspace(0.5, 0.505, 256)
    bounds = nearest_code_bounds(code)
    assert nearest_code_table(bounds) is None
    x = _edge_values(bounds)
    assert torch.equal(nearest_codes(x, code), torch.bucketize(x, bounds).to(torch.uint8))
