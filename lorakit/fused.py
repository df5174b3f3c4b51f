"""A fused SwiGLU product for training on the CPU: silu(gate) * up as one compiled loop each way.

transformers' Llama-family MLP computes `act_fn(gate_proj(x)) * up_proj(x)` as two ops: they write
silu(gate) out and read it back, and autograd saves three [tokens, intermediate] tensors (gate for
silu's backward, silu(gate) and up for the product's). `silu_mul` saves gate and up only and
recomputes silu in its backward, one pass forward and one backward. The arithmetic is eager's op for
op, including its bf16 rounding of silu(gate) and of each gradient product; only exp's last bit may
differ, so results are eager's within one rounding (tests bound it). `use_fused_mlp` switches a
model's MLPs to it; the trainer does so. Memory estimates (lorakit.memory) count eager's three
tensors, what runs on a GPU and under PeakMemoryTracker; on the CPU training saves one less per layer.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.compile import compile_enabled, raise_recompile_limit

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


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


@functools.cache
def _kernels():
    raise_recompile_limit()
    return (torch.compile(_forward, dynamic=True, fullgraph=True),
            torch.compile(_backward, dynamic=True, fullgraph=True))


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _kernels()[0](gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _kernels()[1](grad.contiguous(), gate, up)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; fused on the CPU when lorakit may compile, else the reference."""
    if gate.device.type == "cpu" and gate.shape == up.shape and compile_enabled():
        return _SiluMul.apply(gate, up)
    return silu_mul_reference(gate, up)


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def use_fused_mlp(model: nn.Module) -> int:
    """Route every SiLU-gated Llama-family MLP of `model` through silu_mul; returns how many."""
    count = 0
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if type(module).__name__ in GATED_MLP_CLASSES and type(act).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            count += 1
    return count
