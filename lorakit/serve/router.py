"""Routing without training: pick the adapter for a prompt from the prompt itself (`"model": "auto"`).

Arrow (Ostapenko et al., 2024; peft's ArrowConfig) gives each adapter a prototype per layer: the top right
singular vector of its update B A, the input direction it amplifies most. PEFT scores every token against
the prototypes inside each layer and mixes the top-k adapters per token. The engine routes per request:
the base model reads the prompt once, and each adapter's score is the mean over the prompt's tokens and
the layers it adapts of |x . p| / |x| (sign-free, as a singular vector's sign is arbitrary), divided by the
same score on a few fixed neutral chat prompts; the best adapter answers the whole request.

The division matters. A model's hidden states share a large common direction, whatever the input, and
an adapter whose prototypes lean on it outscores the others on every prompt: measured on three adapters
trained on distinct tasks (benchmarks/routing.py), the raw score sent all 150 prompts to one adapter;
relative to the neutral prompts, every one went to its own task's adapter. No data beyond those fixed
sentences is used, so routing stays training-free. The cost is one base forward over the prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError


def prototype(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The unit top right singular vector of B @ A ([out, r] @ [r, in]) without forming it: B = QR, SVD of R A."""
    _, R = torch.linalg.qr(B.float())
    _, _, vh = torch.linalg.svd(R @ A.float(), full_matrices=False)
    return vh[0]


def prototypes(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{module path: prototype} of one adapter's factors."""
    return {path: prototype(A, B) for path, (A, B) in factors.items()}


@torch.inference_mode()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], input_ids: list[int]) -> dict[str, torch.Tensor]:
    """The input of each adapted layer ([tokens, in], fp32, unit rows) when the base model reads the prompt."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for path, layer in layers.items():
        def keep(module, args, path=path):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            seen[path] = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        hooks.append(layer.register_forward_pre_hook(keep))
    try:
        device = next(model.parameters()).device
        model.model(torch.tensor([input_ids], device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


NEUTRAL = ("Hello, how are you today?", "Tell me something interesting.", "What can you do?")


def score(inputs: dict[str, torch.Tensor], protos: dict[str, torch.Tensor]) -> float:
    """An adapter's mean |x . p| over the prompt's tokens and the layers it adapts."""
    sims = [(inputs[path] @ proto.to(inputs[path].device)).abs().mean() for path, proto in protos.items()
            if path in inputs]
    return float(torch.stack(sims).mean()) if sims else 0.0


class Router:
    """Prototypes of the engine's adapters and their neutral scores (once per adapter), and the choice for a prompt."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[dict[str, torch.Tensor], float]] = {}  # name -> (prototypes, neutral score)
        self._neutral: list[dict[str, torch.Tensor]] | None = None

    def forget(self, name: str) -> None:
        """Drop a removed adapter's prototypes."""
        self.cache.pop(name, None)

    def choose(self, engine, input_ids: list[int]) -> tuple[str, dict[str, float]]:
        """(the best adapter for these prompt tokens, every candidate's score); runs on the engine's thread."""
        names = engine.cache.servable()
        if not names:
            raise LorakitError('"model": "auto" routes among loaded adapters, and none is loaded')
        engine.batch.entries = None  # the base model alone reads the prompts
        if self._neutral is None:
            self._neutral = [layer_inputs(engine.model, engine.layers, neutral_ids(engine, text)) for text in NEUTRAL]
        for name in names:
            if name not in self.cache:
                protos = prototypes(engine.cache.get(name).factors)
                baseline = sum(score(inputs, protos) for inputs in self._neutral) / len(self._neutral)
                self.cache[name] = (protos, max(baseline, 1e-12))
        inputs = layer_inputs(engine.model, engine.layers, input_ids)
        result = {name: score(inputs, self.cache[name][0]) / self.cache[name][1] for name in names}
        return max(result, key=result.get), result


def neutral_ids(engine, text: str) -> list[int]:
    """A neutral sentence as a user turn of the chat template (plain text for a model without one)."""
    if getattr(engine.tokenizer, "chat_template", None):
        return engine.encode([{"role": "user", "content": text}])
    return engine.encode(text)
