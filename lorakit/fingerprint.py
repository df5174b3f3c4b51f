"""A cheap identity for a base model's weights, recorded with an adapter and checked when it is loaded.

An adapter only means something on the base it was trained on; a base with the same shapes but other
weights (another fine-tune, another release) loads it without complaint and gives other outputs. The
fingerprint hashes what stays in floating point whether or not the base is quantized to 4 bits: every
1-D weight (the norms; biases are left out, since `bias="all"` adapters train them) and 64 evenly
spaced rows of the input embedding, each rounded to bf16 so that an fp32, a bf16 and a 4-bit load of
the same checkpoint agree. It takes milliseconds.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

EMBEDDING_ROWS = 64
KEPT = "_lorakit_base_fingerprint"  # set before sharding (FSDP): a rank's parameters are then only pieces
SKIPPED = ("lora_", "modules_to_save", "vera_", "magnitude", "ranknum")  # adapter tensors are not the base


def _canonical(name: str) -> str:
    """A parameter's name as in the plain base model (without the adapter wrappers' path parts)."""
    return name.replace(".base_layer", "").replace(".original_module", "")


def _bf16_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def base_fingerprint(model: nn.Module) -> str | None:
    """16 hex digits identifying the base's weights (None when it has nothing to hash or is not loaded)."""
    if KEPT in vars(model):
        return vars(model)[KEPT]
    digest = hashlib.sha256()
    hashed = 0
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point() and not weight.is_meta:
        rows = torch.linspace(0, weight.shape[0] - 1, min(EMBEDDING_ROWS, weight.shape[0])).long()
        digest.update(f"embedding{tuple(weight.shape)}".encode())
        digest.update(_bf16_bytes(weight[rows]))
        hashed += 1
    vectors = {}
    for name, param in model.named_parameters():
        if (param.dim() == 1 and param.is_floating_point() and not name.endswith("bias")
                and not any(part in name for part in SKIPPED)):
            if param.is_meta:
                return None
            vectors.setdefault(_canonical(name), param)
    for name in sorted(vectors):
        digest.update(name.encode())
        digest.update(_bf16_bytes(vectors[name]))
        hashed += 1
    return digest.hexdigest()[:16] if hashed else None


def keep_fingerprint(model: nn.Module) -> None:
    """Remember the fingerprint of the whole weights, before sharding splits them over processes."""
    vars(model)[KEPT] = base_fingerprint(model)
