"""AdaLoRA on a whole model: add the SVD-form layers, and PEFT AdaLoRA folders both ways.

Saved keys are `base_model.model.<path>.lora_A` / `.lora_E` / `.lora_B` (bare parameters, no `.weight`, no
ranknum). When the config holds a `rank_pattern` (set by the budget schedule), saving keeps only the flagged
ranks and writes the pattern; loading shrinks each layer to its kept ranks first, its ranknum staying the
initial rank, as PEFT's `resize_modules_by_rank_pattern` leaves it (reference: peft `tuners/adalora/model.py`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit.adalora import AdaLoraConfig, AdaLoraLinear, adalora_layers
from lorakit.adapter_types import check_saved_tensors, handler_for
from lorakit.errors import LorakitError, LorakitWarning
from lorakit.inject import (
    _set_submodule,
    adapter_configs,
    check_new_name,
    finish_adding,
    resolve_targets,
)
from lorakit.lora import LoraLayer, is_linear_like
from lorakit.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_base,
    copy_into,
    freeze_saved_modules,
    read_adapter_tensors,
    saved_extra_shapes,
    saved_extras,
    tuner_config_dict,
    write_adapter_folder,
)
from lorakit.peft_keys import peft_key
from lorakit.vera import linear_features


def _plan(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    """The targeted module names, all checked to be linear before the model is touched."""
    targets = resolve_targets(model, config)
    for target in targets:
        module = model.get_submodule(target)
        if isinstance(module, LoraLayer) and not isinstance(module, AdaLoraLinear):
            raise LorakitError(f"target {target!r} already holds another kind of adapter")
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not is_linear_like(base):
            raise LorakitError(f"target {target!r} is a {type(base).__name__}; AdaLoRA adapts linear layers only "
                               "(Linear, transformers Conv1D, 4-bit Linear): leave it out of target_modules")
    unknown = sorted(set(config.rank_pattern or {}) - {f"{t}.lora_E" for t in targets})
    if unknown:
        raise LorakitError(f"rank_pattern names {unknown[0]!r}, which is not a targeted module of this model")
    return targets


def add_adapter(model: nn.Module, config: AdaLoraConfig, name: str = "default") -> nn.Module:
    """Add AdaLoRA adapter `name` at rank init_r on the targeted layers; base frozen, adapter trainable."""
    check_new_name(model, name)
    handler_for(config, adapter_configs(model))
    for target in _plan(model, config):
        module = model.get_submodule(target)
        layer = module if isinstance(module, AdaLoraLinear) else AdaLoraLinear(module)
        layer.add(name, config.init_r, config.lora_alpha, config.lora_dropout, config.init_lora_weights)
        if layer is not module:
            _set_submodule(model, target, layer)
    return finish_adding(model, config, name, config.bias)


def _kept(rank_pattern: dict | None, path: str) -> list[bool] | None:
    return None if rank_pattern is None else rank_pattern.get(f"{path}.lora_E")


def adalora_tensors(model: nn.Module, name: str, prune: bool = False) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors by PEFT's saved key; with `prune`, only the ranks its rank_pattern keeps."""
    config = adapter_configs(model)[name]
    tensors: dict[str, torch.Tensor] = {}
    layers = adalora_layers(model, name)
    for path, layer in layers:
        A, E, B = layer.lora_A[name], layer.lora_E[name], layer.lora_B[name]
        keep = _kept(config.rank_pattern, path) if prune else None
        if keep is not None and sum(keep) != A.shape[0]:
            mask = torch.tensor(keep, device=A.device)
            A, E, B = A[mask], E[mask], B[:, mask]
        tensors.update({peft_key(path, "lora_A"): A, peft_key(path, "lora_E"): E, peft_key(path, "lora_B"): B})
    return {**tensors, **saved_extras(model, name, {path for path, _ in layers}, config.bias)}


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """AdaLoRA adapter `name`'s tensors as saved: PEFT's keys, pruned to the kept ranks, detached copies."""
    return {k: v.detach().contiguous().clone() for k, v in adalora_tensors(model, name, prune=True).items()}


def peft_config_dict(model: nn.Module, name: str) -> dict:
    """The adapter_config.json content PEFT's AdaLoraConfig reads."""
    return tuner_config_dict(model, name, "ADALORA", adalora_layers(model, name))


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write AdaLoRA adapter `name` as a PEFT folder (pruned to its rank_pattern); atomic."""
    return write_adapter_folder(model, path, peft_config_dict(model, name), adapter_state_dict(model, name))


def expected_shapes(model: nn.Module, config: AdaLoraConfig) -> dict[str, tuple[int, ...]]:
    """The saved keys and shapes an AdaLoRA adapter with `config` must have on `model`."""
    shapes: dict[str, tuple[int, ...]] = {}
    targets = _plan(model, config)
    for target in targets:
        module = model.get_submodule(target)
        fan_in, fan_out = linear_features(module.base_layer if isinstance(module, LoraLayer) else module)
        keep = _kept(config.rank_pattern, target)
        rank = config.init_r if keep is None else sum(keep)
        shapes[peft_key(target, "lora_A")] = (rank, fan_in)
        shapes[peft_key(target, "lora_E")] = (rank, 1)
        shapes[peft_key(target, "lora_B")] = (fan_out, rank)
    return {**shapes, **saved_extra_shapes(model, config, set(targets), config.bias)}


def load_adapter(model: nn.Module, folder: Path, config: AdaLoraConfig, name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT (or lorakit) AdaLoRA folder as adapter `name`; the model is unchanged on error."""
    tensors = read_adapter_tensors(folder)
    try:
        expected = expected_shapes(model, config)
    except LorakitError as exc:
        raise LorakitError(f"{folder / CONFIG_NAME}: {exc}") from None
    check_saved_tensors(folder / WEIGHTS_NAME, tensors, expected)
    mismatch = check_base(model, folder)
    if mismatch:
        warnings.warn(mismatch, LorakitWarning, stacklevel=3)
    add_adapter(model, config, name)
    for path, layer in adalora_layers(model, name):
        keep = _kept(config.rank_pattern, path)
        if keep is not None:
            layer.keep_ranks(name, torch.tensor(keep))
    copy_into(adalora_tensors(model, name), tensors)
    if not is_trainable:
        for _, layer in adalora_layers(model, name):
            for table in (layer.lora_A, layer.lora_E, layer.lora_B):
                table[name].requires_grad_(False)
        freeze_saved_modules(model, name)
    return model


__all__ = ["add_adapter", "adapter_state_dict", "save_adapter", "load_adapter", "expected_shapes"]
