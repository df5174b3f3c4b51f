"""A DoRA linear layer: y = (m / n) * (x Wᵀ + s * x Aᵀ Bᵀ) + bias, with n = ||W + s·B·A|| per output row.

n is detached (DoRA paper, section 4.3), so the magnitude m and the LoRA factors are the only gradients.

The reference is PEFT's formula op by op: base(x) + (m/n - 1) * (base(x) - bias) + (m/n) * s * B(A(x)).

The node (bf16/fp16 training, one adapter, no active dropout) is the LoRA node with one per-column
scale c = m/n:
- the forward scales the output in place;
- the backward scales the incoming gradient by c, then runs the LoRA backward;
- m's gradient, sum_t g * (y - bias) / m, comes from the saved output. The next op usually keeps that
  output alive anyway, so no unscaled copy is kept.
Neither path forms the [out, in] matrix W + s·B·A. The norm is
  ||W||² + 2s * <B, W Aᵀ> + s² * <B (A Aᵀ), B>  per row.
||W||² is cached by the layer (W is frozen), so the norm costs one thin product W Aᵀ [out, r].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.dispatch import Kernel, call, register
from lorakit.kernels.lora_linear import HALF, _base_operands, _weight
from lorakit.kernels.lora_linear import _node_accepts as lora_node_accepts

OP = "dora_linear"
ROW_BLOCK_ELEMENTS = 1 << 20  # fp32 row norms form W + s·B·A at most this many elements at a time
NormFn = Callable[[torch.Tensor], torch.Tensor]  # weight [out, in] -> detached fp32 row norms [out]
WeightFn = Callable[[torch.Tensor], torch.Tensor]  # dtype -> the base weight [out, in] (dequantized if 4-bit)


def row_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
             weight_sq: torch.Tensor | None) -> torch.Tensor:
    """||W + s·B·A|| per output row (fp32, detached), never holding the whole [out, in] sum.

    A half-precision W (the training path) uses the expansion: one thin product W·Aᵀ, the rest [out, r].
    An fp32 W forms the sum a block of rows at a time instead: it rounds as PEFT's full sum does (bitwise
    when the layer fits one block), where the expansion's cancellation moves fp32 logits visibly.
    """
    if weight.dtype in HALF and weight_sq is not None:
        return row_norm_expanded(weight, A, B, scale, weight_sq)
    A, B = A.detach().float(), B.detach().float()
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    return torch.cat([torch.linalg.norm(weight[i:i + rows].detach().float() + scale * (B[i:i + rows] @ A), dim=1)
                      for i in range(0, weight.shape[0], rows)])


def row_norm_expanded(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                      weight_sq: torch.Tensor) -> torch.Tensor:
    """||W + s·B·A|| per row as sqrt(||W||² + 2s·<B, W·Aᵀ> + s²·<B·(A·Aᵀ), B>), fp32; weight_sq is ||W||²."""
    a = A.detach().to(weight.dtype)
    w_at = (weight @ a.t()).float()  # [out, r]: the only product that touches W
    scaled_B = B.detach().float() * scale
    gram = A.detach().float() @ A.detach().float().t()  # [r, r]
    sq = weight_sq + 2 * (scaled_B * w_at).sum(1) + ((scaled_B @ gram) * scaled_B).sum(1)
    return sq.clamp_min(0).sqrt()


def row_norm_reference(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + s·B·A|| per output row, the sum formed in full in fp32 (PEFT's way)."""
    full = weight.detach().float() + scale * (B.detach().float() @ A.detach().float())
    return torch.linalg.norm(full, dim=1)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / n: the per-output-row factor DoRA applies to W + s·B·A."""
    return magnitude / norm


def add_dora_update(result: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scale: float, norm: torch.Tensor,
                    base_result: torch.Tensor | None) -> torch.Tensor:
    """result + (m/n - 1) * x Wᵀ + (m/n) * s * x Aᵀ Bᵀ, in result's dtype (PEFT's DoraLinearLayer.forward).

    `base_result` is base(x) when x saw no dropout (x Wᵀ is then base_result - bias); with dropout it
    is None and x Wᵀ is recomputed on the dropped-out x, as PEFT does. fp32 inputs compute in the
    adapter's dtype; half activations keep theirs, with the factors cast to it (as in add_low_rank_update).
    """
    if x.dtype in HALF and A.dtype != x.dtype:
        A, B = A.to(x.dtype), B.to(x.dtype)
    else:
        x = x.to(A.dtype)
    factor = dora_scale(magnitude.to(torch.float32), norm).to(x.dtype if x.dtype in HALF else magnitude.dtype)
    lora_result = F.linear(F.linear(x, A), B)
    if base_result is None:
        base_result = F.linear(x, weight.to(x.dtype))
    elif bias is not None:
        base_result = base_result - bias
    return (result + ((factor - 1) * base_result + factor * lora_result * scale)).to(result.dtype)


def dora_linear_reference(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor,
                          magnitude: torch.Tensor, dropout: nn.Module, scale: float, weight_fn: WeightFn,
                          norm_fn: NormFn) -> torch.Tensor:
    """base(x) plus DoRA's update for one adapter, op by op through autograd."""
    result = base(x)
    weight = weight_fn(x.dtype if x.dtype in HALF else A.dtype)
    dropped = dropout(x)
    return add_dora_update(result, dropped, weight, base.bias, A, B, magnitude, scale, norm_fn(weight),
                           result if dropped is x else None)


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, frozen, bias, A, B, magnitude, scale, state, norm_fn):
        dtype = x.dtype
        weight = _weight(frozen, state, dtype)
        a, b = A.to(dtype), B.to(dtype) * scale
        factor = dora_scale(magnitude.detach().float(), norm_fn(weight)).to(dtype)
        x2d = x.reshape(-1, x.shape[-1])
        h = F.linear(x2d, a)
        y = F.linear(x2d, weight).addmm_(h, b.t()).mul_(factor)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x2d, h, frozen, bias, A, B, magnitude, y, factor)
        ctx.scale, ctx.state, ctx.x_shape = scale, state, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2d, h, frozen, bias, A, B, magnitude, y, factor = ctx.saved_tensors
        dtype = x2d.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = grad_m = None
        grad_sum = g.sum(0, dtype=torch.float32) if bias is not None else None
        if ctx.needs_input_grad[5]:
            # sum_t g * z / n with z = (y - bias) / (m/n): the output stands in for the unscaled product.
            gy = (g * y).sum(0, dtype=torch.float32)
            if grad_sum is not None:
                gy = gy - grad_sum * bias.float()
            grad_m = (gy / magnitude.float()).to(magnitude.dtype)
        gc = g * factor
        a, b = A.to(dtype), B.to(dtype) * ctx.scale
        grad_h = gc @ b
        if ctx.needs_input_grad[0]:
            grad_x = (gc @ _weight(frozen, ctx.state, dtype)).addmm_(grad_h, a).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_sum.to(dtype)
        if ctx.needs_input_grad[3]:
            grad_A = (grad_h.t() @ x2d).to(A.dtype)
        if ctx.needs_input_grad[4]:
            grad_B = ((gc.t() @ h) * ctx.scale).to(B.dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, grad_m, None, None, None


def _node(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
          dropout: nn.Module, scale: float, weight_fn: WeightFn, norm_fn: NormFn) -> torch.Tensor:
    frozen, bias, state = _base_operands(base, x.dtype)
    return _DoraLinear.apply(x, frozen, bias, A, B, magnitude, scale, state, norm_fn)


def _node_accepts(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                  dropout: nn.Module, scale: float, weight_fn: WeightFn, norm_fn: NormFn) -> str | None:
    return lora_node_accepts(x, base, A, B, dropout, scale)


register(OP, [
    Kernel("one_node", _node, accepts=_node_accepts),
    Kernel("reference", dora_linear_reference),
])


def dora_linear(x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                dropout: nn.Module, scale: float, weight_fn: WeightFn, norm_fn: NormFn) -> torch.Tensor:
    """One DoRA adapter over a linear base, with the first implementation that applies."""
    return call(OP, x, base, A, B, magnitude, dropout, scale, weight_fn, norm_fn)
