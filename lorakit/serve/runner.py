"""A Llama-family decoder run over per-sequence KV slots: what continuous batching needs from the model.

transformers' generate keeps one cache for one fixed batch; the engine's batch changes at every step. Here
every sequence owns a slot of a preallocated cache ([slots, kv_heads, capacity, head_dim] per layer, as
gpt-fast's static cache), the running ones compacted into slots 0..B-1 so a step reads plain views. The
forward calls the model's own modules (embeddings, norms, projections, which may be lorakit layers, the MLP,
the head); only attention is done here, over the slots, with each row's own length.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Mistral and Qwen2 share it

from lorakit.errors import LorakitError
from lorakit.kernels.cache_attention import cache_attention

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def check_model(model: nn.Module) -> None:
    """Raise unless `model` is a decoder this runner implements."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise LorakitError(f"the engine runs {', '.join(SUPPORTED)}; got {name}")


class SlotCache:
    """Keys and values of up to `slots` sequences of up to `capacity` tokens, per layer."""

    def __init__(self, model: nn.Module, slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, config.num_key_value_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity

    @staticmethod
    def bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
        """Cache bytes one token of one sequence takes (keys and values of every layer)."""
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize

    def move(self, source: int, target: int, length: int) -> None:
        """Copy slot `source`'s first `length` positions into slot `target` (compaction)."""
        for cache in (*self.keys, *self.values):
            cache[target, :, :length].copy_(cache[source, :, :length])


def _attention(module: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: SlotCache,
               layer: int, slots: slice, starts: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = hidden.shape
    head_dim = module.head_dim
    q = module.q_proj(hidden).view(batch, tokens, -1, head_dim).transpose(1, 2)
    k = module.k_proj(hidden).view(batch, tokens, -1, head_dim).transpose(1, 2)
    v = module.v_proj(hidden).view(batch, tokens, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys, values = cache.keys[layer][slots], cache.values[layer][slots]
    if tokens == 1:  # decoding: every row writes one position, its own
        rows = torch.arange(batch, device=starts.device)
        keys[rows, :, starts] = k[:, :, 0].to(keys.dtype)
        values[rows, :, starts] = v[:, :, 0].to(values.dtype)
    else:
        for row in range(batch):  # prefill: a chunk per row at its own start
            start = int(starts[row])
            keys[row, :, start:start + tokens] = k[row]
            values[row, :, start:start + tokens] = v[row]
    length = int(starts.max()) + tokens
    out = cache_attention(q, keys[:, :, :length], values[:, :, :length], starts, module.scaling)
    return module.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


@torch.inference_mode()
def forward(model: nn.Module, cache: SlotCache, input_ids: torch.Tensor, slots: slice, starts: torch.Tensor,
            last: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at each row's `last` index (default: its final token); rows are cache slots `slots` from `starts`."""
    backbone = model.model
    hidden = backbone.embed_tokens(input_ids)
    positions = starts[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
    cos, sin = backbone.rotary_emb(hidden, positions)
    for index, layer in enumerate(backbone.layers):
        hidden = hidden + _attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, cache, index, slots,
                                     starts)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    picked = hidden[:, -1] if last is None else hidden[rows, last]
    return model.lm_head(backbone.norm(picked)).float()
