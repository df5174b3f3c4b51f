"""AdamW with 8-bit blockwise optimizer states (bitsandbytes' AdamW8bit), with a paged mode.

Adam's m and v take 8 bytes per parameter in fp32. Here each is stored as uint8 codes with one fp32
absmax per block of 256 values, ~2.03 bytes per parameter for both: m with the signed dynamic map,
v with the unsigned one (bitsandbytes' qmap1/qmap2). Each step dequantizes the states of a bucket
of tensors laid end to end, does the plain fp32 AdamW update and requantizes with fresh absmax
values. Tensors with fewer than `min_8bit_size` elements (norms, biases) keep fp32 states, as in
bitsandbytes: the absmax overhead and the quantization error are not worth it there.
"""

from __future__ import annotations

import itertools
import math

import torch

from lorakit.constants import OPTIMIZERS
from lorakit.errors import LorakitError
from lorakit.quant.blockwise8 import create_dynamic_map, dequantize_blockwise, quantize_blockwise

BLOCKSIZE = 256  # bitsandbytes' optimizer blocksize since 0.44
# Values updated together by default. Per-op overhead dominates a step over many small adapter tensors; the
# bound keeps a bucket's fp32 temporaries (~6 of them) near 6 MB, and on a paged GPU run what the device holds.
BUCKET_ELEMENTS = 1 << 18


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose m, v are blockwise 8-bit; `paged=True` keeps them in (pinned) CPU memory.

    Tensors that share a device and a step count are updated together, in buckets of at most
    `bucket_elements` values (a larger tensor alone): the same results as one tensor at a time.
    Paged: each step copies one bucket's states to the parameters' device, updates, and copies them
    back (non_blocking, ordered on the current CUDA stream, synchronized at the end of the step), so
    the device holds the states of one bucket at a time. On a CPU-only machine the states already
    live on the CPU and paged changes nothing.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096, paged: bool = False,
                 bucket_elements: int = BUCKET_ELEMENTS):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise LorakitError(f"AdamW8bit: lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                               f"weight_decay={weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise LorakitError(f"AdamW8bit: betas must be in [0, 1), got {betas}")
        if not isinstance(bucket_elements, int) or bucket_elements < 1:
            raise LorakitError(f"AdamW8bit: bucket_elements must be a positive int, got {bucket_elements!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.bucket_elements = bucket_elements
        self.paged = paged
        self.signed_code = create_dynamic_map(signed=True)
        self.unsigned_code = create_dynamic_map(signed=False)

    def _state_device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.paged else param.device

    def _init_state(self, param: torch.Tensor) -> dict:
        device = self._state_device(param)
        pin = self.paged and torch.cuda.is_available()
        n = param.numel()
        if n < self.min_8bit_size:
            zeros = [torch.zeros(param.shape, dtype=torch.float32, device=device) for _ in range(2)]
            return {"step": 0, "exp_avg": _pinned(zeros[0], pin), "exp_avg_sq": _pinned(zeros[1], pin)}
        blocks = math.ceil(n / BLOCKSIZE)
        # Code 127 of the signed map and code 0 of the unsigned map are 0.0, so absmax 0 reads back zeros.
        return {
            "step": 0,
            "state1": _pinned(torch.full((n,), 127, dtype=torch.uint8, device=device), pin),
            "absmax1": _pinned(torch.zeros(blocks, dtype=torch.float32, device=device), pin),
            "state2": _pinned(torch.zeros(n, dtype=torch.uint8, device=device), pin),
            "absmax2": _pinned(torch.zeros(blocks, dtype=torch.float32, device=device), pin),
        }

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        copied_to_cuda = False
        for group in self.param_groups:
            # Tensors that share a device, a step count and a state kind are updated as one flat tensor:
            # the same values as one at a time (blocks never straddle two tensors), far fewer small ops.
            pending: dict[tuple, list[torch.Tensor]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise LorakitError("AdamW8bit: sparse gradients are not supported; use dense embeddings")
                if not self.state[param]:
                    self.state[param] = self._init_state(param)
                state = self.state[param]
                state["step"] += 1
                pending.setdefault((param.device, state["step"], "state1" in state), []).append(param)
            for (device, step, quantized), params in pending.items():
                codes = (self.signed_code, self.unsigned_code) if quantized else None
                for bucket in _buckets(params, quantized, self.bucket_elements):
                    _update(bucket, [self.state[p] for p in bucket], group, step, codes)
                copied_to_cuda |= self.paged and device.type == "cuda"
        if copied_to_cuda:
            torch.cuda.current_stream().synchronize()  # the host copies of the states are complete
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load like torch.optim.Optimizer, but keep uint8/fp32 states as saved (torch would cast them
        to the parameter's dtype) and on the state device (CPU when paged)."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        super().load_state_dict(state_dict)
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                device, pin = self._state_device(param), self.paged and torch.cuda.is_available()
                self.state[param] = {key: _pinned(value.to(device, copy=True), pin) if torch.is_tensor(value) else value
                                     for key, value in state_dict["state"][saved_id].items()}


def _pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin and not tensor.is_pinned() else tensor


def _span(numel: int, quantized: bool) -> int:
    """Room a tensor takes in a bucket: whole blocks when quantized, so no block holds two tensors."""
    return -(-numel // BLOCKSIZE) * BLOCKSIZE if quantized else numel


def bucket_sizes(numels: list[int], quantized: bool, limit: int = BUCKET_ELEMENTS) -> list[list[int]]:
    """How consecutive tensors of these sizes are bucketed: runs spanning at most `limit` values (a larger
    tensor is a bucket alone)."""
    buckets: list[list[int]] = []
    size = limit
    for numel in numels:
        span = _span(numel, quantized)
        if size + span > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(numel)
        size += span
    return buckets


def _buckets(params: list[torch.Tensor], quantized: bool, limit: int) -> list[list[torch.Tensor]]:
    """The params grouped as `bucket_sizes` groups their sizes."""
    remaining = iter(params)
    return [[next(remaining) for _ in sizes] for sizes in bucket_sizes([p.numel() for p in params], quantized, limit)]


def _flat(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype, spans: list[int] | None = None,
          fill: int = 0) -> torch.Tensor:
    """A new tensor: the tensors end to end on device as dtype, each padded with `fill` to its span."""
    pieces = []
    for i, tensor in enumerate(tensors):
        pieces.append(tensor.reshape(-1).to(device, dtype, non_blocking=True))
        if spans is not None and spans[i] > tensor.numel():
            pieces.append(torch.full((spans[i] - tensor.numel(),), fill, dtype=dtype, device=device))
    return torch.cat(pieces)


def _update(params: list[torch.Tensor], states: list[dict], group: dict, step: int,
            codes: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Read the bucket's states (dequantized when codes are given), do the fp32 AdamW update, store them back."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    device = params[0].device
    sizes = [p.numel() for p in params]
    spans = [_span(n, codes is not None) for n in sizes]
    total = sum(spans)
    if codes is not None:
        signed_code, unsigned_code = codes
        # Padding reads back as 0.0 (code 127 signed, 0 unsigned) with a zero gradient, so it stays 0 and
        # never raises a block's absmax.
        exp_avg = dequantize_blockwise(_flat([s["state1"] for s in states], device, torch.uint8, spans, 127),
                                       _flat([s["absmax1"] for s in states], device, torch.float32),
                                       signed_code, BLOCKSIZE, (total,))
        exp_avg_sq = dequantize_blockwise(_flat([s["state2"] for s in states], device, torch.uint8, spans),
                                          _flat([s["absmax2"] for s in states], device, torch.float32),
                                          unsigned_code, BLOCKSIZE, (total,))
    else:
        exp_avg = _flat([s["exp_avg"] for s in states], device, torch.float32)
        exp_avg_sq = _flat([s["exp_avg_sq"] for s in states], device, torch.float32)
    grad = _flat([p.grad for p in params], device, torch.float32, spans)
    # fp32 master math even for bf16/fp16 params; the result is rounded once when copied back.
    value = _flat([p.detach() for p in params], device, torch.float32, spans)
    # Same operations, in the same order, as torch.optim.AdamW's single-tensor path.
    value.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # ** 0.5 as torch writes it: pow may differ from sqrt
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    value.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    offsets = [0, *itertools.accumulate(spans)][:-1]
    for param, offset, n in zip(params, offsets, sizes):
        param.copy_(value[offset:offset + n].view(param.shape))
    if codes is None:
        for state, offset, n in zip(states, offsets, sizes):
            state["exp_avg"].copy_(exp_avg[offset:offset + n].view(state["exp_avg"].shape), non_blocking=True)
            state["exp_avg_sq"].copy_(exp_avg_sq[offset:offset + n].view(state["exp_avg_sq"].shape),
                                      non_blocking=True)
        return
    for name, tensor, code in (("1", exp_avg, signed_code), ("2", exp_avg_sq, unsigned_code)):
        stored, absmax = quantize_blockwise(tensor, code, BLOCKSIZE)
        if name == "2":
            stored = _floor_positive(stored, tensor)
        for state, offset, n in zip(states, offsets, sizes):
            state["state" + name].copy_(stored[offset:offset + n], non_blocking=True)
            blocks = slice(offset // BLOCKSIZE, -(-(offset + n) // BLOCKSIZE))
            state["absmax" + name].copy_(absmax[blocks], non_blocking=True)


def _floor_positive(codes: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """Store a positive second moment as at least the smallest positive code, never as 0.

    The nearest code to v < ~1.6e-7 * block max is 0.0, and Adam then divides m by eps alone: on a
    real QLoRA run that made single-tensor updates 6x too large. Rounding v up only shrinks those
    updates. (bitsandbytes' CPU lookup table lands such values on a small positive code too.)
    """
    return torch.where((codes == 0) & (exp_avg_sq.reshape(-1) > 0), torch.ones_like(codes), codes)


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit with paged=True: states in CPU memory, visiting the device one tensor at a time."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, paged=True)


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """torch AdamW ('adamw', fused where every parameter is on CPU/CUDA), AdamW8bit, or PagedAdamW8bit."""
    params = list(params)
    if name == "adamw":
        tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "paged_adamw8bit":
        return PagedAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise LorakitError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")
