"""A LoRA linear layer as one autograd node: base product and low-rank update, forward and backward.

Autograd over `base(x) + scale * x @ A.T @ B.T` sends x two gradients, `grad_y @ W` from the base
and `(grad_y @ scale*B) @ A` from the update, and adds them in a separate pass over [tokens, in];
around them sit ~8 small nodes (casts of A and B, the scale, views). Here the update's input
gradient is added into the base's in place (`addmm_`: one pass, one rounding), and the adapter
gradients come from the same two thin products autograd would run. Values are the unfused path's:
the forward is bit-identical; only x's gradient differs, by being rounded once instead of twice.

The node covers the training hot path, one live adapter without dropout over a float or 4-bit
linear at bf16/fp16; the reference (base(x) plus `add_low_rank_update`) runs everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.dequant_4bit import dequantize_4bit
from lorakit.kernels.dispatch import Kernel, call, register

OP = "lora_linear"
HALF = (torch.bfloat16, torch.float16)


def add_low_rank_update(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """result + scale * x @ A.T @ B.T, in result's dtype.

    fp32 inputs compute in the adapter's dtype, as PEFT does. Half-precision activations keep their
    dtype and the (fp32 master) adapter weights are cast to it: the thin matmuls then run at bf16
    speed, like autocast, without a round trip of the activations through fp32. The scale is folded
    into B ([out, r]) and the add into the second matmul (addmm), which saves two passes over the
    [tokens, out] output per adapter.
    """
    if x.dtype in HALF and A.dtype != x.dtype:
        A, B = A.to(x.dtype), B.to(x.dtype)
    else:
        x = x.to(A.dtype)
    h = F.linear(x, A)
    scaled_B = B * scale
    device = result.device.type
    autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else result.dtype
    if result.dtype == h.dtype == autocast_dtype:
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), scaled_B.t())
        return out.view(result.shape)
    return result + F.linear(h, scaled_B).to(result.dtype)


def lora_linear_reference(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, dropout: nn.Module,
                          scale: float) -> torch.Tensor:
    """base(x) + scale * dropout(x) @ A.T @ B.T through autograd, op by op."""
    return add_low_rank_update(base(x), dropout(x), A, B, scale)


def _weight(frozen, state, dtype):
    return frozen if state is None else dequantize_4bit(frozen, state, dtype)


def _is_linear4bit(module: nn.Module) -> bool:
    # This layer does not import lorakit.quant; the node needs exactly its Linear4bit (a subclass may override forward).
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__ == "lorakit.quant.linear4bit"


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
    if _is_linear4bit(base):
        if base.compute_dtype != dtype:
            return None
        bias = None if base.bias is None else base.bias.to(dtype)
        return base.packed, bias, base.quant_state
    if type(base) is nn.Linear and base.weight.dtype == dtype and not base.weight.requires_grad:
        return base.weight, base.bias, None
    return None


def _node_accepts(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, dropout: nn.Module,
                  scale: float) -> str | None:
    if x.dtype not in HALF:
        return f"{x.dtype} activations (the node is for bf16/fp16)"
    if not torch.is_grad_enabled() or not (A.requires_grad or B.requires_grad):
        return "no gradient wanted (inference)"
    if not (isinstance(dropout, nn.Identity) or not dropout.training or dropout.p == 0):
        return "adapter dropout while training"
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
        return "autocast to another dtype"
    operands = _base_operands(base, x.dtype)
    if operands is None:
        return "the base layer has hooks, trains, or holds another dtype"
    if operands[1] is not None and operands[1].dtype != x.dtype:
        return "the base bias holds another dtype"
    return None


def _node(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, dropout: nn.Module,
          scale: float) -> torch.Tensor:
    frozen, bias, state = _base_operands(base, x.dtype)
    return _LoraLinear.apply(x, frozen, bias, A, B, scale, state)


register(OP, [
    Kernel("one_node", _node, accepts=_node_accepts),
    Kernel("reference", lora_linear_reference),
])


def lora_linear(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, dropout: nn.Module,
                scale: float) -> torch.Tensor:
    """base(x) + scale * dropout(x) @ A.T @ B.T for one adapter, with the first implementation that applies."""
    return call(OP, x, base, A, B, dropout, scale)
