"""Attention for CPU training on short sequences: plain matmul-softmax-matmul instead of CPU flash attention.

PyTorch's CPU flash-attention kernel (what transformers' default "sdpa" runs) has a slow backward:
on SmolLM2-135M's shapes (batch 4, 256 tokens, 9 query / 3 key-value heads of 64) one layer takes
~57 ms forward+backward in bf16 against ~14 ms for three plain kernels. The plain form stores the
[heads, T, T] probabilities for backward (bf16: 2 bytes per score), so it is used only while
q_len * kv_len <= MAX_SCORES; longer sequences, decoding steps, other devices and the features
it does not implement go to transformers' sdpa path unchanged.

Numerics are those of transformers' "eager" attention (bit-identical when the scale is a power of
two, i.e. head_dim 4, 16, 64, 256): bf16 scores, a softmax computed in fp32 and stored in the input
dtype, masked positions at the dtype's minimum (so a fully masked padding row gives a uniform
row, not NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lorakit_cpu"
MAX_SCORES = 1024 * 1024  # per head; 1k x 1k bf16 scores = 2 MB per head per layer saved for backward
IMPLEMENTATIONS = ("auto", NAME, "sdpa", "eager")  # what load_model / TrainConfig accept


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def _use_plain(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    q_len, kv_len = query.shape[2], key.shape[2]
    special = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "cache", "sliding_window", "s_aux"))
    return (query.device.type == "cpu" and not special and 1 < q_len == kv_len and q_len * kv_len <= MAX_SCORES
            and (attention_mask is None or attention_mask.dtype == torch.bool))


def plain_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """softmax(q k^T * scaling, masked) v for [B, H, T, D] inputs (key/value may have fewer heads)."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    # Autocast would run the softmax in fp32 and keep a fp32 copy for backward; the input dtype is enough
    # to store probabilities, and the softmax kernel accumulates in fp32 internally.
    with torch.autocast(query.device.type, enabled=False):
        # Scaling q ([T, D]) instead of the scores ([T, T]) is exact for power-of-two scales (head_dim 64).
        scores = torch.matmul(query * scaling, key.transpose(2, 3))
        if mask is None:  # causal
            length = query.shape[2]
            mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril_()
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout, training=training)
        return torch.matmul(probs, value)


class _GroupedAttention(torch.autograd.Function):
    """plain_attention's math without repeating k and v: a key-value head's G query heads form one
    [G*T, D] matrix, so one matmul serves the group and backward sums the group inside the matmul.
    Masks are filled in place (no masked copy of the scores), and a causal mask is not saved: the
    softmax gradient is already exactly 0 where the probabilities are."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        q = torch.empty((batch, kv_heads, groups, length, dim), dtype=query.dtype, device=query.device)
        torch.mul(query.view(batch, kv_heads, groups, length, dim), scaling, out=q)
        q = q.view(batch, kv_heads, groups * length, dim)
        scores = torch.matmul(q, key.transpose(2, 3))
        keep = _keep(mask, length, key.shape[2], query.device)
        scores.view(batch, kv_heads, groups, length, -1).masked_fill_(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        # A padding mask can mask whole rows (uniform probabilities): their gradient must be zeroed.
        ctx.save_for_backward(q, key, value, probs, mask)
        ctx.scaling, ctx.groups = scaling, groups
        return torch.matmul(probs, value).view(batch, heads, length, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, key, value, probs, mask = ctx.saved_tensors
        batch, heads, length, dim = grad_out.shape
        kv_heads = key.shape[1]
        grad_out = grad_out.reshape(batch, kv_heads, ctx.groups * length, dim)
        grad_value = torch.matmul(probs.transpose(2, 3), grad_out)
        grad_scores = torch._softmax_backward_data(torch.matmul(grad_out, value.transpose(2, 3)), probs, -1,
                                                   probs.dtype)
        if mask is not None:
            grad_scores.view(batch, kv_heads, ctx.groups, length, -1).masked_fill_(~mask[:, :, None], 0.0)
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scaling).view(batch, heads, length, dim)
        grad_key = torch.matmul(grad_scores.transpose(2, 3), q)
        return grad_query, grad_key, grad_value, None, None


def _keep(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """The positions to keep, broadcastable to [B, kv_heads, groups, q_len, kv_len]."""
    if mask is None:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril_()
    return mask[:, :, None]


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor:
    """plain_attention (no dropout) computed per key-value group; mask None (causal) or bool [B, 1, T, S]."""
    with torch.autocast(query.device.type, enabled=False):
        return _GroupedAttention.apply(query, key, value, mask, scaling)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: plain attention when it pays, sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not _use_plain(query, key, attention_mask, kwargs) or (attention_mask is None and not causal):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if (dropout == 0.0 or not module.training) and (attention_mask is None or attention_mask.shape[1] == 1):
        out = grouped_attention(query, key, value, attention_mask, scale)
    else:
        out = plain_attention(query, key, value, attention_mask, scale, dropout, module.training)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME a transformers attention implementation (masks as for sdpa: boolean, or None when causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def set_attention(model: nn.Module, implementation: str = "auto") -> None:
    """"auto": lorakit's CPU attention for sdpa models; otherwise the named transformers implementation."""
    if implementation == "auto":
        use_fast_cpu_attention(model)
    elif getattr(getattr(model, "config", None), "_attn_implementation", None) != implementation:
        if implementation == NAME:
            register()
        model.set_attn_implementation(implementation)


def use_fast_cpu_attention(model: nn.Module) -> bool:
    """Switch a transformers model that uses sdpa to NAME; returns whether it switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
