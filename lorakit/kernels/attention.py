"""Attention for CPU training on short sequences: plain matmul-softmax-matmul instead of CPU flash attention.

PyTorch's CPU flash-attention kernel (what transformers' default "sdpa" runs) has a slow backward on
short training sequences; three plain kernels are faster there (docs/benchmarks.md, attention). The
plain form stores the causal [heads, T, T] probabilities for backward (10/16 of them with the causal
blocks of `grouped_attention`), so it is used only while q_len * kv_len <= MAX_SCORES; longer
sequences, decoding steps, other devices and the features it does not implement go to transformers'
sdpa path unchanged, which is also the reference (what the model runs without lorakit).

Numerics are those of transformers' "eager" attention (bit-identical outputs when the scale is a
power of two, i.e. head_dim 4, 16, 64, 256; with several causal blocks fp32 may differ in the last
bits, summed in another order): scores in the input dtype, a softmax computed in fp32 and stored in
the input dtype, masked positions at the dtype's minimum (a fully masked padding row gives a uniform
row, not NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.dispatch import Kernel, call, register

OP = "attention"
NAME = "lorakit_cpu"
MAX_SCORES = 1024 * 1024  # per head; 1k x 1k bf16 scores = 2 MB per head per layer saved for backward
IMPLEMENTATIONS = ("auto", NAME, "sdpa", "eager")  # what load_model / TrainConfig accept


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


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


MAX_QUERY_BLOCKS = 4  # causal row blocks: 4 skip 6/16 of the scores; more blocks make small matmuls
MIN_BLOCK_ROWS = 64  # query positions per block at least (shorter sequences are one block)


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[start, end) query positions of the causal row blocks for a sequence of `length`."""
    count = max(1, min(MAX_QUERY_BLOCKS, length // MIN_BLOCK_ROWS))
    size = -(-length // count)
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def causal_score_count(length: int) -> int:
    """(query, key) pairs grouped_attention computes and stores per head for a causal sequence."""
    return sum((end - start) * end for start, end in query_blocks(length))


def _key_ends(mask: torch.Tensor | None, blocks: list[tuple[int, int]], kv_len: int) -> list[int]:
    """Keys each row block needs: up to its own end when it is causal, else all.

    A block whose rows keep a later key, or hold a fully masked row (left padding: eager spreads such a
    row uniformly over all keys), takes every key.
    """
    if mask is None:
        return [end for _, end in blocks]
    ends = []
    for start, end in blocks:
        rows = mask[:, :, start:end]
        causal = not (rows[..., end:].any() or not rows.any(-1).all())
        ends.append(end if causal else kv_len)
    return ends


def _block_keep(mask: torch.Tensor | None, start: int, end: int, key_start: int, key_end: int,
                device: torch.device) -> torch.Tensor:
    """Kept (query, key) pairs of a row block's keys [key_start, key_end), broadcastable to [B, kv, rows, G, keys]."""
    if mask is None:
        keys = torch.arange(key_start, key_end, device=device)
        return (keys <= torch.arange(start, end, device=device)[:, None])[:, None]
    return mask[:, :, start:end, None, key_start:key_end]


class _GroupedAttention(torch.autograd.Function):
    """plain_attention's math without repeating k and v, skipping causal blocks.

    A key-value head's G query heads form one [rows*G, D] matrix (position-major), so one matmul serves
    the group and backward sums the group inside the matmul. Rows go in blocks (query_blocks); a block's
    scores stop at its last position's key, so with 4 blocks 6/16 of the causal [T, T] scores are
    never computed nor stored. Each block keeps its own contiguous tensors: strided views of a shared
    [T, T] buffer cost a copy per matmul on the CPU, more than the skipped work saves. The key and
    value gradients sum the blocks' bf16 products in fp32 (rounded once per block, as often as eager's
    per-head sum). Masks are filled in place, and a causal mask is not saved: the softmax gradient is
    already exactly 0 where the probabilities are.
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        key, value = key.contiguous(), value.contiguous()  # [B, T, kv, D] views: a batched matmul would copy
        blocks = query_blocks(length)
        ends = _key_ends(mask, blocks, key.shape[2])
        grouped = query.view(batch, kv_heads, groups, length, dim).transpose(2, 3)
        out = query.new_empty((batch, length, kv_heads, groups, dim))  # the caller's [B, T, H, D] layout
        saved = []
        for (start, end), key_end in zip(blocks, ends):
            rows = end - start
            q = query.new_empty((batch, kv_heads, rows, groups, dim))
            torch.mul(grouped[:, :, start:end], scaling, out=q)
            q = q.view(batch, kv_heads, rows * groups, dim)
            scores = torch.matmul(q, key[:, :, :key_end].transpose(2, 3))
            # Causal: every key before the block's first query is kept, so only its diagonal square is masked.
            key_start = start if mask is None else 0
            drop = ~_block_keep(mask, start, end, key_start, key_end, query.device)
            scores.view(batch, kv_heads, rows, groups, key_end)[..., key_start:].masked_fill_(
                drop, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            block_out = torch.matmul(probs, value[:, :, :key_end])
            out[:, start:end].copy_(block_out.view(batch, kv_heads, rows, groups, dim).transpose(1, 2))
            saved += [q, probs]
        ctx.save_for_backward(key, value, mask, *saved)
        ctx.scaling, ctx.groups, ctx.blocks, ctx.ends = scaling, groups, blocks, ends
        return out.view(batch, length, heads, dim).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        key, value, mask, *saved = ctx.saved_tensors
        batch, heads, length, dim = grad_out.shape
        kv_heads, groups = key.shape[1], ctx.groups
        grouped = grad_out.view(batch, kv_heads, groups, length, dim).transpose(2, 3)
        grad_query = grad_out.new_empty((batch, length, kv_heads, groups, dim))
        grad_key = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for (start, end), key_end, q, probs in zip(ctx.blocks, ctx.ends, saved[::2], saved[1::2]):
            rows = end - start
            block_grad = grouped[:, :, start:end].reshape(batch, kv_heads, rows * groups, dim)
            grad_value[:, :, :key_end] += torch.matmul(probs.transpose(2, 3), block_grad)
            grad_probs = torch.matmul(block_grad, value[:, :, :key_end].transpose(2, 3))
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            if mask is not None:  # a fully masked (padding) row has uniform probabilities but no gradient
                grad_scores.view(batch, kv_heads, rows, groups, key_end).masked_fill_(
                    ~_block_keep(mask, start, end, 0, key_end, key.device), 0.0)
            grad_q = torch.matmul(grad_scores, key[:, :, :key_end]).mul_(ctx.scaling)
            grad_query[:, start:end].copy_(grad_q.view(batch, kv_heads, rows, groups, dim).transpose(1, 2))
            grad_key[:, :, :key_end] += torch.matmul(grad_scores.transpose(2, 3), q)
        return (grad_query.view(batch, length, heads, dim).transpose(1, 2), grad_key.to(key.dtype),
                grad_value.to(value.dtype), None, None)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor:
    """plain_attention (no dropout) per key-value group in causal row blocks; mask None or bool [B, 1, T, S]."""
    with torch.autocast(query.device.type, enabled=False):
        return _GroupedAttention.apply(query, key, value, mask, scaling)


def common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dtype: autocast's when it is on (as its matmuls would cast), else the promoted one.

    Under autocast an fp32 model's projections come out in bf16 while RoPE's fp32 cos/sin promote q and k
    back to fp32, so q, k and v can arrive in two dtypes; the kernels here run with autocast off.
    """
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


_SPECIAL = ("softcap", "position_bias", "cache", "sliding_window", "s_aux")


def _plain_accepts(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs) -> str | None:
    if query.device.type != "cpu":
        return "not a CPU tensor"
    special = [k for k in _SPECIAL if kwargs.get(k) is not None]
    if special:
        return f"{special[0]} is not implemented"
    q_len, kv_len = query.shape[2], key.shape[2]
    if not 1 < q_len == kv_len:
        return "a decoding step (query shorter than keys)"
    if q_len * kv_len > MAX_SCORES:
        return f"{q_len}x{kv_len} scores exceed MAX_SCORES ({MAX_SCORES})"
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return "a float attention mask"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and not causal:
        return "bidirectional without a mask"
    return None


def _grouped_accepts(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs) -> str | None:
    if dropout != 0.0 and module.training:
        return "attention dropout while training"
    if attention_mask is not None and attention_mask.shape[1] != 1:
        return "a per-head mask"
    return _plain_accepts(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def _scale(query: torch.Tensor, scaling: float | None) -> float:
    return scaling if scaling is not None else query.shape[-1] ** -0.5


def _grouped(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    return grouped_attention(query, key, value, attention_mask, _scale(query, scaling)).transpose(1, 2).contiguous()


def _plain(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    out = plain_attention(query, key, value, attention_mask, _scale(query, scaling), dropout, module.training)
    return out.transpose(1, 2).contiguous()


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)[0]


register(OP, [
    Kernel("grouped", _grouped, accepts=_grouped_accepts),
    Kernel("plain", _plain, accepts=_plain_accepts),
    Kernel("sdpa", _sdpa),
])


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: plain attention when it pays, sdpa otherwise."""
    query, key, value = common_dtype(query, key, value)
    return call(OP, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs), None


def register_with_transformers() -> None:
    """Make NAME a transformers attention implementation (masks as for sdpa: boolean, or None when causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
