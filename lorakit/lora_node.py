"""A LoRA linear layer as one autograd node: base product and low-rank update, forward and backward.

Autograd over `base(x) + scale * x @ A.T @ B.T` sends x two gradients, `grad_y @ W` from the base
and `(grad_y @ scale*B) @ A` from the update, and adds them in a separate pass over [tokens, in];
around them sit ~8 small nodes (casts of A and B, the scale, views). Here the update's input
gradient is added into the base's in place (`addmm_`: one pass, one rounding), and the adapter
gradients come from the same two thin products autograd would run. Values are the unfused path's:
the forward is bit-identical; only x's gradient differs, by being rounded once instead of twice.

It covers the training hot path, one live adapter without dropout over a float or 4-bit linear
at bf16/fp16; `LoraLinear.forward` keeps the general path for everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant.linear4bit import Linear4bit
from lorakit.quant.nf4 import dequantize_4bit

HALF = (torch.bfloat16, torch.float16)


def _weight(frozen, state, dtype):
    return frozen if state is None else dequantize_4bit(frozen, state, dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, frozen, bias, A, B, scale, state):
        dtype = x.dtype
        a, b = A.to(dtype), B.to(dtype) * scale  # as add_low_rank_update rounds them
        x2d = x.reshape(-1, x.shape[-1])
        y = F.linear(x2d, _weight(frozen, state, dtype), bias)
        h = F.linear(x2d, a)
        y.addmm_(h, b.t())
        ctx.save_for_backward(x2d, h, frozen, A, B)
        ctx.scale, ctx.state, ctx.x_shape = scale, state, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2d, h, frozen, A, B = ctx.saved_tensors
        dtype = x2d.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1])
        a, b = A.to(dtype), B.to(dtype) * ctx.scale
        grad_h = g @ b
        grad_x = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _weight(frozen, ctx.state, dtype)).addmm_(grad_h, a).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_A = (grad_h.t() @ x2d).to(A.dtype)
        if ctx.needs_input_grad[4]:
            grad_B = ((g.t() @ h) * ctx.scale).to(B.dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


def _base_operands(base: nn.Module, dtype: torch.dtype):
    """(frozen weight or packed codes, bias, quant state) of a base layer the node can run, else None."""
    if base._forward_hooks or base._forward_pre_hooks:  # the node bypasses base.forward, so its hooks too
        return None
    if type(base) is Linear4bit:
        if base.compute_dtype != dtype:
            return None
        bias = None if base.bias is None else base.bias.to(dtype)
        return base.packed, bias, base.quant_state
    if type(base) is nn.Linear and base.weight.dtype == dtype and not base.weight.requires_grad:
        return base.weight, base.bias, None
    return None


def lora_linear(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, dropout: nn.Module,
                scale: float) -> torch.Tensor | None:
    """base(x) + scale * x @ A.T @ B.T as one autograd node, or None where the general path must run."""
    if x.dtype not in HALF or not torch.is_grad_enabled() or not (A.requires_grad or B.requires_grad):
        return None
    if not (isinstance(dropout, nn.Identity) or not dropout.training or dropout.p == 0):
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
        return None
    operands = _base_operands(base, x.dtype)
    if operands is None:
        return None
    frozen, bias, state = operands
    if bias is not None and bias.dtype != x.dtype:
        return None
    return _LoraLinear.apply(x, frozen, bias, A, B, scale, state)
