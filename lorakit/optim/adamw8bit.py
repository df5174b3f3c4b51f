"""AdamW with 8-bit blockwise optimizer states (bitsandbytes' AdamW8bit), with a paged mode.

Adam's m and v take 8 bytes per parameter in fp32. Here each is stored as uint8 codes with one fp32
absmax per block of 256 values, ~2.03 bytes per parameter for both: m with the signed dynamic map,
v with the unsigned one (bitsandbytes' qmap1/qmap2). Each step dequantizes a tensor's states,
does the plain fp32 AdamW update and requantizes with fresh absmax values. Tensors with fewer than
`min_8bit_size` elements (norms, biases) keep fp32 states, as in bitsandbytes: the absmax overhead
and the quantization error are not worth it there.
"""

from __future__ import annotations

import math

import torch

from lorakit.errors import LorakitError
from lorakit.quant.blockwise8 import create_dynamic_map, dequantize_blockwise, quantize_blockwise

BLOCKSIZE = 256  # bitsandbytes' optimizer blocksize since 0.44


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose m, v are blockwise 8-bit; `paged=True` keeps them in (pinned) CPU memory.

    Paged: each step copies one tensor's states to its parameter's device, updates, and copies
    them back (non_blocking, ordered on the current CUDA stream, synchronized at the end of the
    step), so the device holds the states of one tensor at a time. On a CPU-only machine the
    states already live on the CPU and paged changes nothing.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096, paged: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise LorakitError(f"AdamW8bit: lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                               f"weight_decay={weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise LorakitError(f"AdamW8bit: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
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
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise LorakitError("AdamW8bit: sparse gradients are not supported; use dense embeddings")
                if not self.state[param]:
                    self.state[param] = self._init_state(param)
                state = self.state[param]
                state["step"] += 1
                _update(param, state, group, self.signed_code, self.unsigned_code)
                copied_to_cuda |= self.paged and param.device.type == "cuda"
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


def _update(param: torch.Tensor, state: dict, group: dict, signed_code: torch.Tensor,
            unsigned_code: torch.Tensor) -> None:
    """Dequantize (or fetch) the states, do the fp32 AdamW update, store them back."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay, step = group["lr"], group["eps"], group["weight_decay"], state["step"]
    device = param.device
    quantized = "state1" in state
    if quantized:
        exp_avg = dequantize_blockwise(state["state1"].to(device, non_blocking=True),
                                       state["absmax1"].to(device, non_blocking=True),
                                       signed_code, BLOCKSIZE, param.shape)
        exp_avg_sq = dequantize_blockwise(state["state2"].to(device, non_blocking=True),
                                          state["absmax2"].to(device, non_blocking=True),
                                          unsigned_code, BLOCKSIZE, param.shape)
    else:
        exp_avg = state["exp_avg"].to(device, non_blocking=True)
        exp_avg_sq = state["exp_avg_sq"].to(device, non_blocking=True)
    grad = param.grad.float()
    # fp32 master math even for bf16/fp16 params; the result is rounded once when copied back.
    value = param.float()
    # Same operations, in the same order, as torch.optim.AdamW's single-tensor path.
    value.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # ** 0.5 as torch writes it: pow may differ from sqrt
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    value.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if value.data_ptr() != param.data_ptr():
        param.copy_(value)
    if quantized:
        for name, tensor, code in (("1", exp_avg, signed_code), ("2", exp_avg_sq, unsigned_code)):
            codes, absmax = quantize_blockwise(tensor, code, BLOCKSIZE)
            if name == "2":
                codes = _floor_positive(codes, tensor)
            state["state" + name].copy_(codes, non_blocking=True)
            state["absmax" + name].copy_(absmax, non_blocking=True)
    else:
        if state["exp_avg"].data_ptr() != exp_avg.data_ptr():
            state["exp_avg"].copy_(exp_avg, non_blocking=True)
            state["exp_avg_sq"].copy_(exp_avg_sq, non_blocking=True)


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


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


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
