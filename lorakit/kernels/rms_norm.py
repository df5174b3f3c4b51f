"""Llama's RMSNorm with a hand-derived backward, fused for CPU training.

fp32 statistics, the normalized input rounded to the input dtype, times the weight, as
LlamaRMSNorm does; the fused node saves the input and one fp32 rstd per row instead of an fp32
copy of the input, and runs one compiled loop each way.
"""

from __future__ import annotations

import torch

from lorakit.kernels.compile import compile_machine_check, compiled, dispatch_mode_check
from lorakit.kernels.dispatch import Kernel, call, register

OP = "rms_norm"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, op for op."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _forward(x, weight, eps):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = (x32 * rstd).to(x.dtype)
    out = (weight.float() * normed.float()).to(torch.promote_types(weight.dtype, x.dtype))
    return out, rstd


def _backward(grad, x, weight, rstd, want_weight: bool):
    x32 = x.float()
    normed = (x32 * rstd).to(x.dtype)
    grad_normed = (grad.float() * weight.float()).to(grad.dtype).float()  # eager's mul backward, then the cast's
    # d/dx of x * rsqrt(mean(x^2) + eps): rstd * g - x * rstd^3 * mean(g * x)
    grad_x = rstd * grad_normed - x32 * (rstd * rstd * rstd) * (grad_normed * x32).mean(-1, keepdim=True)
    grad_weight = None
    if want_weight:
        grad_weight = (grad.float() * normed.float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return grad_x.to(x.dtype), grad_weight


_FORWARD, _BACKWARD = compiled(_forward), compiled(_backward)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _FORWARD(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _BACKWARD(grad.contiguous(), x, weight, rstd, ctx.needs_input_grad[1])
        return grad_x, grad_weight, None


def _fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def _fused_accepts(x: torch.Tensor, weight: torch.Tensor, eps: float) -> str | None:
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if weight.shape != x.shape[-1:]:
        return "weight does not match the last dimension"
    return dispatch_mode_check()


register(OP, [
    Kernel("compiled", _fused, compile_machine_check, _fused_accepts),
    Kernel("reference", rms_norm_reference),
])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm with the first implementation that applies."""
    return call(OP, x, weight, eps)
