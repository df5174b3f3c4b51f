"""The SwiGLU product silu(gate) * up, fused for CPU training: one compiled loop forward, one backward.

Eager PyTorch writes silu(gate) out and reads it back, and autograd saves three [tokens, intermediate]
tensors (gate, silu(gate), up). The fused node saves gate and up only and recomputes silu in its
backward. The arithmetic is eager's op for op, including its bf16 rounding of silu(gate) and of each
gradient product; only exp's last bit may differ, so results are eager's within one rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.kernels.compile import compile_machine_check, compiled, dispatch_mode_check
from lorakit.kernels.dispatch import Kernel, call, register

OP = "silu_mul"


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as transformers computes it (autograd through both ops)."""
    return F.silu(gate) * up


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    silu = F.silu(gate.float()).to(gate.dtype)  # eager rounds silu's output to the input dtype
    return (silu.float() * up.float()).to(torch.promote_types(gate.dtype, up.dtype))


def _backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = gate.float()
    sigmoid = torch.sigmoid(g)
    silu = (g * sigmoid).to(gate.dtype).float()
    grad_silu = (grad.float() * up.float()).to(gate.dtype)  # the product's backward, rounded as eager
    grad_up = (grad.float() * silu).to(up.dtype)
    grad_gate = (grad_silu.float() * sigmoid * (1 + g * (1 - sigmoid))).to(gate.dtype)  # aten silu_backward
    return grad_gate, grad_up


_FORWARD, _BACKWARD = compiled(_forward), compiled(_backward)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _FORWARD(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _BACKWARD(grad.contiguous(), gate, up)


def _fused(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(gate, up)


def _fused_accepts(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    if gate.device.type != "cpu":
        return "not a CPU tensor"
    if gate.shape != up.shape:
        return "gate and up differ in shape (broadcast)"
    return dispatch_mode_check()


register(OP, [
    Kernel("compiled", _fused, compile_machine_check, _fused_accepts),
    Kernel("reference", silu_mul_reference),
])


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the first implementation that applies."""
    return call(OP, gate, up)
