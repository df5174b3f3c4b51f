"""Fast paths for any model a user trains: `enable_fast_training` switches them on, `disable_fast_training` off.

What it switches, each reported in the returned `FastTraining`:
- attention: a model on transformers' "sdpa" goes to lorakit's CPU attention (kernels/attention.py);
- fused norm and SwiGLU: Llama-family RMSNorm and SiLU-gated MLP forwards go through lorakit.kernels;
- the loss: a forward given `labels` computes the chunked cross-entropy from the last hidden states
  (the full logits are never built; `logits` is None in that output);
- the allocator: glibc keeps freed memory (process-wide, so it is named; disable puts the defaults back).
Each replaced forward is an instance attribute over the class's; the one it replaced is kept and put back.
"""

from __future__ import annotations

import types
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.kernels import allocator
from lorakit.kernels.attention import IMPLEMENTATIONS, NAME, register_with_transformers
from lorakit.kernels.cross_entropy import chunked_cross_entropy
from lorakit.kernels.rms_norm import rms_norm
from lorakit.kernels.swiglu import silu_mul

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# RMSNorm classes whose forward is exactly LlamaRMSNorm's (weight * normalized, eps in variance_epsilon).
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_MISSING = object()
_SAVED = "_lorakit_fast_training"  # the attribute on the model that holds what enable replaced


@dataclass
class FastTraining:
    """What enable_fast_training switched (or disable_fast_training undid)."""

    attention: str | None = None  # "sdpa -> lorakit_cpu", or None when unchanged
    rms_norm: int = 0  # norms routed through the fused kernel
    swiglu: int = 0  # MLPs routed through the fused kernel
    loss: bool = False  # forward(labels=...) computes the chunked loss
    allocator: bool = False  # process-wide: glibc keeps freed memory
    modules: dict = field(default_factory=dict, repr=False, compare=False)  # module -> replaced forward

    def summary(self) -> dict[str, Any]:
        """The switches as plain values (for printing or logging)."""
        return {k: v for k, v in asdict(self).items() if k != "modules"}


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _fused_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, self.weight, self.variance_epsilon)


def _is_gated_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return type(module).__name__ in GATED_MLP_CLASSES and type(act).__name__ in ("SiLU", "SiLUActivation")


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon")


def _replace_forward(module: nn.Module, forward, replaced: dict) -> None:
    replaced.setdefault(module, module.__dict__.get("forward", _MISSING))
    module.forward = types.MethodType(forward, module)


def set_attention(model: nn.Module, implementation: str = "auto") -> None:
    """"auto": lorakit's CPU attention for sdpa models; otherwise the named transformers implementation."""
    if implementation == "auto":
        use_fast_cpu_attention(model)
    elif getattr(getattr(model, "config", None), "_attn_implementation", None) != implementation:
        if implementation == NAME:
            register_with_transformers()
        model.set_attn_implementation(implementation)


def use_fast_cpu_attention(model: nn.Module) -> bool:
    """Switch a transformers model that uses sdpa to lorakit's CPU attention; returns whether it switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register_with_transformers()
    model.set_attn_implementation(NAME)
    return True


def chunked_lm_loss(model: nn.Module, labels: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, Any] | None:
    """(mean next-token loss, the backbone's output) without full logits, or None for a model it cannot run.

    It runs when the output head is a bias-free nn.Linear over the backbone's last hidden states.
    """
    if not chunked_lm_loss_applies(model):
        return None
    head = model.get_output_embeddings()
    out = getattr(model, model.base_model_prefix)(**inputs)
    hidden = out[0]
    sharded = getattr(head, "sharded_cross_entropy", None)  # a head FSDP shards on its own (train/distributed.py)
    if sharded is not None:
        return sharded(hidden, labels), out
    return chunked_cross_entropy(hidden, head.weight.to(hidden.dtype), labels), out


def _loss_forward(original):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None or kwargs.get("logits_to_keep", 0) or kwargs.get("return_dict") is False:
            return original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)  # the HF Trainer's token count over accumulation
        kwargs.pop("logits_to_keep", None)
        if self.training:
            kwargs.setdefault("use_cache", False)  # a training forward keeps no KV cache
        loss, out = chunked_lm_loss(self, labels, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if num_items is not None:  # transformers' loss then sums over tokens and divides by num_items
            loss = loss * (labels[:, 1:] != -100).sum() / num_items
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))
    return forward


def _switch_attention(model: nn.Module) -> str | None:
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return f"{before} -> {NAME}" if use_fast_cpu_attention(model) else None


def enable_fast_training(model: nn.Module, *, attention: bool = True, fused: bool = True, loss: bool = True,
                         allocator_setting: bool = True) -> FastTraining:
    """Switch on lorakit's training fast paths for `model` (any transformers causal LM); returns what changed."""
    if getattr(model, _SAVED, None) is not None:
        return getattr(model, _SAVED)
    done = FastTraining()
    done.attention = _switch_attention(model) if attention else None
    for module in model.modules() if fused else ():
        if _is_gated_mlp(module):
            _replace_forward(module, _fused_mlp_forward, done.modules)
            done.swiglu += 1
        elif _is_rms_norm(module):
            _replace_forward(module, _fused_norm_forward, done.modules)
            done.rms_norm += 1
    if loss and chunked_lm_loss_applies(model):
        _replace_forward(model, _loss_forward(model.forward), done.modules)
        done.loss = True
    if allocator_setting and not allocator.retaining():
        done.allocator = allocator.retain_freed_memory()
    setattr(model, _SAVED, done)
    return done


def chunked_lm_loss_applies(model: nn.Module) -> bool:
    """True when `chunked_lm_loss` can run `model` (a bias-free linear head over a named backbone)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return isinstance(head, nn.Linear) and head.bias is None and isinstance(backbone, nn.Module)


def disable_fast_training(model: nn.Module) -> FastTraining:
    """Undo enable_fast_training exactly: original forwards, attention and allocator setting; returns what it undid."""
    done = getattr(model, _SAVED, None)
    if done is None:
        return FastTraining()
    for module, forward in done.modules.items():
        if forward is _MISSING:
            del module.forward
        else:
            module.forward = forward
    if done.attention is not None:
        model.set_attn_implementation(done.attention.split(" -> ")[0])
    if done.allocator:
        allocator.restore_default_allocator()
    delattr(model, _SAVED)
    return done


__all__ = ["IMPLEMENTATIONS", "FastTraining", "chunked_lm_loss", "disable_fast_training", "enable_fast_training",
           "set_attention", "use_fast_cpu_attention"]
