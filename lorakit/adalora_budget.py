"""AdaLoRA's rank budget, as PEFT's RankAllocator runs it (peft/tuners/adalora/layer.py), as free functions.

Each step: sensitivity |w * grad| of every A, E, B entry, smoothed by an EMA (beta1) and its uncertainty by
another (beta2). The total rank budget falls from init_r per layer to target_r per layer along a cubic between
`tinit` and `total_step - tfinal`; every `deltaT` steps the singular values E whose triplet score is lowest are
zeroed down to the budget, and the final mask is taken at `total_step - tfinal` and held to the end. The kept
ranks are the config's `rank_pattern`, which saving uses to prune the adapter (PEFT's format).

    loss = loss + lk.orthogonal_regularization(model)
    loss.backward(); optimizer.step()
    lk.update_and_allocate(model, step)
    optimizer.zero_grad()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.adalora import AdaLoraConfig, AdaLoraLinear, adalora_layers, orthogonality_penalty
from lorakit.errors import LorakitError
from lorakit.inject import adapter_configs

_SCORES_ATTR = "lorakit_adalora_scores"
_FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclass
class _Scores:
    """EMA of the sensitivity and of its uncertainty, per (module path, factor), for one adapter's config."""

    config: AdaLoraConfig
    importance: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    uncertainty: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


def _adalora_name(model: nn.Module, name: str | None) -> str:
    configs = {n: c for n, c in adapter_configs(model).items() if isinstance(c, AdaLoraConfig)}
    if name is not None:
        if name not in configs:
            raise LorakitError(f"no AdaLoRA adapter named {name!r}; this model has {sorted(configs) or 'none'}")
        return name
    trainable = [n for n in configs if any(layer.lora_E[n].requires_grad for _, layer in adalora_layers(model, n))]
    if len(trainable) != 1:
        raise LorakitError(f"found {len(trainable)} trainable AdaLoRA adapters ({trainable}); name the one to budget")
    return trainable[0]


def budget_schedule(config: AdaLoraConfig, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(total rank allowed at `step`, whether to mask at it): flat, then cubic down to the target, then flat."""
    tinit, tfinal, total_step = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * (remaining**3) + target_budget), step % config.deltaT == 0


def _update_scores(scores: _Scores, layers: list[tuple[str, AdaLoraLinear]], name: str,
                   config: AdaLoraConfig) -> None:
    beta1, beta2 = config.beta1, config.beta2
    with torch.no_grad():
        for path, layer in layers:
            for factor in _FACTORS:
                param = getattr(layer, factor)[name]
                if param.grad is None:
                    raise LorakitError(f"{path}.{factor} has no gradient: call update_and_allocate after backward() "
                                       "and optimizer.step(), before zero_grad()")
                key = (path, factor)
                if key not in scores.importance:
                    scores.importance[key] = torch.zeros_like(param)
                    scores.uncertainty[key] = torch.zeros_like(param)
                sensitivity = (param * param.grad).abs()
                importance = beta1 * scores.importance[key] + (1 - beta1) * sensitivity
                uncertainty = beta2 * scores.uncertainty[key] + (1 - beta2) * (sensitivity - importance).abs()
                scores.importance[key], scores.uncertainty[key] = importance, uncertainty


def _triplet_scores(scores: _Scores, layers: list[tuple[str, AdaLoraLinear]]) -> dict[str, torch.Tensor]:
    """Per layer, one score per rank: E's own plus the mean scores of its row of A and its column of B."""
    triplets = {}
    for path, _ in layers:
        element = {f: scores.importance[(path, f)] * scores.uncertainty[(path, f)] for f in _FACTORS}
        row_a = element["lora_A"].mean(dim=1, keepdim=True)
        col_b = element["lora_B"].mean(dim=0).view(-1, 1)
        triplets[path] = element["lora_E"].view(-1) + (row_a + col_b).view(-1)
    return triplets


def _mask_to_budget(scores: _Scores, layers: list[tuple[str, AdaLoraLinear]], name: str,
                    budget: int, init_budget: int) -> dict[str, list[bool]]:
    """Zero the E entries of the lowest-scoring ranks, keeping `budget` in all; the kept flags per layer."""
    triplets = _triplet_scores(scores, layers)
    pruned = init_budget - budget
    threshold = torch.kthvalue(torch.cat(list(triplets.values())), k=pruned)[0].item() if pruned > 0 else None
    rank_pattern = {}
    with torch.no_grad():
        for path, layer in layers:
            keep = triplets[path] > threshold if threshold is not None else torch.ones_like(triplets[path]).bool()
            layer.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)
            rank_pattern[f"{path}.lora_E"] = keep.tolist()
    return rank_pattern


def _mask_with_pattern(layers: list[tuple[str, AdaLoraLinear]], name: str, rank_pattern: dict) -> None:
    with torch.no_grad():
        for path, layer in layers:
            keep = torch.tensor(rank_pattern[f"{path}.lora_E"], device=layer.lora_E[name].device)
            layer.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)


def update_and_allocate(model: nn.Module, global_step: int, name: str | None = None) -> int:
    """One budget step after optimizer.step() (grads still set): update scores, mask E; the budget in force."""
    name = _adalora_name(model, name)
    config = adapter_configs(model)[name]
    layers = adalora_layers(model, name)
    init_budget = sum(layer.lora_A[name].shape[0] for _, layer in layers)
    target_budget = config.target_r * len(layers)
    all_scores = model.__dict__.setdefault(_SCORES_ATTR, {})
    if name not in all_scores or all_scores[name].config is not config:  # a re-added adapter starts afresh
        all_scores[name] = _Scores(config)
    scores = all_scores[name]
    end = config.total_step - config.tfinal
    if global_step < end:
        _update_scores(scores, layers, name, config)
        budget, mask = budget_schedule(config, global_step, init_budget, target_budget)
        if mask:
            config.rank_pattern = _mask_to_budget(scores, layers, name, budget, init_budget)
        return budget
    if global_step == end:  # the final allocation, kept to the end of training
        config.rank_pattern = _mask_to_budget(scores, layers, name, target_budget, init_budget)
        all_scores.pop(name)
    elif config.rank_pattern is not None:  # masked entries still get gradients: hold them at zero
        _mask_with_pattern(layers, name, config.rank_pattern)
    return target_budget


def orthogonal_regularization(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """orth_reg_weight * mean ||P P^T - I||_F over the adapter's A and B: add it to the training loss."""
    name = _adalora_name(model, name)
    return adapter_configs(model)[name].orth_reg_weight * orthogonality_penalty(model, name)
