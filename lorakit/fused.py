"""Fused SwiGLU product and RMSNorm for training on the CPU: one compiled loop each way instead of 2-8 ops.

transformers' Llama-family MLP computes `act_fn(gate_proj(x)) * up_proj(x)` as two ops: they write
silu(gate) out and read it back, and autograd saves three [tokens, intermediate] tensors (gate for
silu's backward, silu(gate) and up for the product's). `silu_mul` saves gate and up only and
recomputes silu in its backward, one pass forward and one backward. The arithmetic is eager's op for
op, including its bf16 rounding of silu(gate) and of each gradient product; only exp's last bit may
differ, so results are eager's within one rounding (tests bound it). `use_fused_mlp` switches a
model's MLPs to it; the trainer does so. Memory estimates (lorakit.memory) count eager's three
tensors, what runs on a GPU and under PeakMemoryTracker; on the CPU training saves one less per layer.

`rms_norm` is the Llama RMSNorm (fp32 statistics, normalized input rounded to the input dtype, times
the weight) with a hand-derived backward; it saves the input and one fp32 rstd per row instead of an
fp32 copy of the input, and `use_fused_rms_norm` switches a model's norms to it.
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
# RMSNorm classes whose forward is exactly LlamaRMSNorm's (weight * normalized, eps in variance_epsilon).
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


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


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, op for op."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _norm_forward(x, weight, eps):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = (x32 * rstd).to(x.dtype)
    out = (weight.float() * normed.float()).to(torch.promote_types(weight.dtype, x.dtype))
    return out, rstd


def _norm_backward(grad, x, weight, rstd, want_weight: bool):
    x32 = x.float()
    normed = (x32 * rstd).to(x.dtype)
    grad_normed = (grad.float() * weight.float()).to(grad.dtype).float()  # eager's mul backward, then the cast's
    # d/dx of x * rsqrt(mean(x^2) + eps): rstd * g - x * rstd^3 * mean(g * x)
    grad_x = rstd * grad_normed - x32 * (rstd * rstd * rstd) * (grad_normed * x32).mean(-1, keepdim=True)
    grad_weight = None
    if want_weight:
        grad_weight = (grad.float() * normed.float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return grad_x.to(x.dtype), grad_weight


@functools.cache
def _norm_kernels():
    raise_recompile_limit()
    return (torch.compile(_norm_forward, dynamic=True, fullgraph=True),
            torch.compile(_norm_backward, dynamic=True, fullgraph=True))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _norm_kernels()[0](x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _norm_kernels()[1](grad.contiguous(), x, weight, rstd, ctx.needs_input_grad[1])
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm; fused on the CPU when lorakit may compile, else the reference."""
    if x.device.type == "cpu" and weight.shape == x.shape[-1:] and compile_enabled():
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def _fused_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, self.weight, self.variance_epsilon)


def use_fused_rms_norm(model: nn.Module) -> int:
    """Route every Llama-family RMSNorm of `model` through rms_norm; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_norm_forward, module)
            count += 1
    return count


def use_fused_kernels(model: nn.Module) -> int:
    """use_fused_mlp and use_fused_rms_norm: what lorakit's trainer runs with; returns modules switched."""
    return use_fused_mlp(model) + use_fused_rms_norm(model)
