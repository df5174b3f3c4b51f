"""Attention of a batch's new tokens over each row's own KV cache slot, rows of different lengths: serving.

Row b's T new queries sit at positions starts[b] .. starts[b] + T - 1 and see the keys up to their own
position. The reference is PyTorch's scaled_dot_product_attention with that boolean mask. On the CPU it
runs the flash kernel, slow for a decoding step's single query per row (a few milliseconds per layer at 64
rows); `grouped` serves a key-value head's query heads with one matmul (no repeated keys and values), the
scores masked in place, a softmax in fp32 and a second matmul. Numerics are those of transformers' eager
attention: scores and probabilities in the input dtype, the softmax computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.kernels.dispatch import Kernel, call, register

OP = "cache_attention"


def visible(starts: torch.Tensor, tokens: int, length: int) -> torch.Tensor:
    """[B, T, length] bool: query t of row b (at position starts[b] + t) sees key positions up to its own."""
    positions = starts[:, None] + torch.arange(tokens, device=starts.device)
    return torch.arange(length, device=starts.device)[None, None, :] <= positions[:, :, None]


def cache_attention_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                              scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling) v for q [B, H, T, D] over keys/values [B, kv, L, D] (the first L cached positions)."""
    mask = visible(starts, query.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask[:, None],
                                          scale=scaling, enable_gqa=query.shape[1] != keys.shape[1])


def _grouped(query, keys, values, starts, scaling):
    batch, heads, tokens, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    # A key-value head's queries as one [T * G, D] matrix, position-major: one matmul per (row, kv head).
    q = (query * scaling).view(batch, kv_heads, groups, tokens, dim).transpose(2, 3).reshape(
        batch, kv_heads, tokens * groups, dim)
    # A cache slice [B, kv, :L, D] is strided per row; multiplying by its transpose copies it inside the
    # matmul, slower than one explicit contiguous copy first.
    scores = torch.matmul(q, keys.to(query.dtype).contiguous().transpose(2, 3))  # [B, kv, T * G, L]
    hidden = ~visible(starts, tokens, length)[:, None, :, None, :]
    scores.view(batch, kv_heads, tokens, groups, length).masked_fill_(hidden, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, values.to(query.dtype))  # [B, kv, T * G, D]
    return out.view(batch, kv_heads, tokens, groups, dim).permute(0, 1, 3, 2, 4).reshape(batch, heads, tokens, dim)


def _grouped_accepts(query, keys, values, starts, scaling) -> str | None:
    if query.shape[1] % keys.shape[1]:
        return "query heads are not a multiple of key-value heads"
    return None


register(OP, [
    Kernel("grouped", _grouped, accepts=_grouped_accepts),
    Kernel("reference", cache_attention_reference),
])


def cache_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Attention of q [B, H, T, D] (row b's queries at starts[b] + t) over keys/values [B, kv, L, D]."""
    return call(OP, query, keys, values, starts, scaling)
