"""VeRA on a whole model: add the layers around one shared projection pair, and PEFT VeRA folders both ways.

The model-level pair is saved as `base_model.vera_A` / `base_model.vera_B` (PEFT's VeraModel holds it there),
the per-layer vectors as `base_model.model.<path>.vera_lambda_b` / `.vera_lambda_d` (reference: peft
`tuners/vera/model.py::_get_adapter_state_dict`). With save_projection=False the pair is regenerated from
`projection_prng_key` on load, as PEFT does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit.adapter_types import check_saved_tensors, handler_for
from lorakit.errors import LorakitError, LorakitWarning
from lorakit.inject import (
    _set_submodule,
    adapter_configs,
    check_new_name,
    finish_adding,
    resolve_targets,
)
from lorakit.lora import LoraLayer, _adapter_dtype, _param_device, is_linear_like
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
from lorakit.vera import VeraConfig, VeraLinear, VeraProjections, linear_features, vera_projections

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


def _lora_bias(bias: str) -> str:
    # PEFT's "vera_only" is the same rule as LoRA's "lora_only": the biases of adapted layers.
    return "lora_only" if bias == "vera_only" else bias


def _plan(model: nn.Module, config: VeraConfig) -> tuple[list[str], int, int]:
    """The targeted module names and the largest in/out features over them (the shared pair's size)."""
    targets = resolve_targets(model, config)
    max_in = max_out = 0
    for target in targets:
        module = model.get_submodule(target)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not is_linear_like(base):
            raise LorakitError(f"target {target!r} is a {type(base).__name__}; VeRA adapts linear layers only "
                               "(Linear, transformers Conv1D, 4-bit Linear): leave it out of target_modules")
        fan_in, fan_out = linear_features(base)
        max_in, max_out = max(max_in, fan_in), max(max_out, fan_out)
    return targets, max_in, max_out


def _check_siblings(model: nn.Module, config: VeraConfig) -> None:
    for other_name, other in adapter_configs(model).items():
        if other.projection_prng_key != config.projection_prng_key:
            raise LorakitError(f"VeRA adapter {other_name!r} uses projection_prng_key={other.projection_prng_key}; "
                               f"every VeRA adapter of a model needs the same key (PEFT's rule), got "
                               f"{config.projection_prng_key}")
        if other.save_projection != config.save_projection:
            raise LorakitError(f"VeRA adapter {other_name!r} has save_projection={other.save_projection}; every "
                               "VeRA adapter of a model must save its projections, or none (PEFT's rule)")


def add_adapter(model: nn.Module, config: VeraConfig, name: str = "default") -> nn.Module:
    """Add VeRA adapter `name`: one seeded projection pair shared by the targeted layers; base frozen."""
    check_new_name(model, name)
    handler_for(config, adapter_configs(model))
    _check_siblings(model, config)
    targets, max_in, max_out = _plan(model, config)
    first = model.get_submodule(targets[0])
    first = first.base_layer if isinstance(first, LoraLayer) else first
    vera_A, vera_B = vera_projections(config.r, max_in, max_out, config.projection_prng_key)
    dtype = _adapter_dtype(first)
    if dtype is not None:
        # PEFT casts the shared pair to a half base's dtype, then back up to fp32 (its saved values are rounded).
        vera_A, vera_B = vera_A.to(dtype).float(), vera_B.to(dtype).float()
    device = _param_device(first)
    projections = VeraProjections(vera_A.to(device), vera_B.to(device))
    for target in targets:
        module = model.get_submodule(target)
        layer = module if isinstance(module, VeraLinear) else VeraLinear(module)
        layer.add(name, projections, config.vera_dropout, config.d_initial, config.init_weights)
        if layer is not module:
            _set_submodule(model, target, layer)
    return finish_adding(model, config, name, _lora_bias(config.bias))


def _vera_layers(model: nn.Module, name: str) -> list[tuple[str, VeraLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, VeraLinear) and name in m.scaling]


def vera_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s live tensors by PEFT's saved key: what save writes and load fills."""
    config = adapter_configs(model)[name]
    tensors: dict[str, torch.Tensor] = {}
    layers = _vera_layers(model, name)
    for path, layer in layers:
        tensors[peft_key(path, "vera_lambda_b")] = layer.vera_lambda_b[name]
        tensors[peft_key(path, "vera_lambda_d")] = layer.vera_lambda_d[name]
    if config.save_projection and layers:
        projections = layers[0][1].vera_projections[name]
        tensors.update(zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B)))
    return {**tensors, **saved_extras(model, name, {path for path, _ in layers}, _lora_bias(config.bias))}


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """VeRA adapter `name`'s tensors under PEFT's saved key names, detached copies."""
    return {k: v.detach().contiguous().clone() for k, v in vera_tensors(model, name).items()}


def peft_config_dict(model: nn.Module, name: str) -> dict:
    """The adapter_config.json content PEFT's VeraConfig reads."""
    return tuner_config_dict(model, name, "VERA", _vera_layers(model, name))


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write VeRA adapter `name` as a PEFT folder; atomic."""
    return write_adapter_folder(model, path, peft_config_dict(model, name), adapter_state_dict(model, name))


def expected_shapes(model: nn.Module, config: VeraConfig) -> dict[str, tuple[int, ...]]:
    """The saved keys and shapes a VeRA adapter with `config` must have on `model` (projections included)."""
    targets, max_in, max_out = _plan(model, config)
    shapes: dict[str, tuple[int, ...]] = {}
    for target in targets:
        module = model.get_submodule(target)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        shapes[peft_key(target, "vera_lambda_b")] = (linear_features(base)[1],)
        shapes[peft_key(target, "vera_lambda_d")] = (config.r,)
    if config.save_projection:
        shapes.update(zip(PROJECTION_KEYS, ((config.r, max_in), (max_out, config.r))))
    return {**shapes, **saved_extra_shapes(model, config, set(targets), _lora_bias(config.bias))}


def _check_tensors(file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                   config: VeraConfig) -> dict[str, torch.Tensor]:
    """The file's tensors to copy, after checking them against `expected`; stray projections are dropped."""
    tensors = dict(tensors)
    if not config.save_projection and any(k in tensors for k in PROJECTION_KEYS):
        warnings.warn(f"{file}: holds vera_A/vera_B but save_projection is false; they are ignored and the pair is "
                      "regenerated from projection_prng_key, as PEFT does", LorakitWarning, stacklevel=4)
        for key in PROJECTION_KEYS:
            tensors.pop(key, None)
    if config.save_projection and not all(k in tensors for k in PROJECTION_KEYS):
        raise LorakitError(f"{file}: save_projection is true but the file lacks {PROJECTION_KEYS[0]!r} / "
                           f"{PROJECTION_KEYS[1]!r}; re-save the adapter with its projections")
    check_saved_tensors(file, tensors, expected)
    return tensors


def load_adapter(model: nn.Module, folder: Path, config: VeraConfig, name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT (or lorakit) VeRA folder as adapter `name`; the model is unchanged on error."""
    tensors = read_adapter_tensors(folder)
    try:
        expected = expected_shapes(model, config)
    except LorakitError as exc:
        raise LorakitError(f"{folder / CONFIG_NAME}: {exc}") from None
    tensors = _check_tensors(folder / WEIGHTS_NAME, tensors, expected, config)
    mismatch = check_base(model, folder)
    if mismatch:
        warnings.warn(mismatch, LorakitWarning, stacklevel=3)
    add_adapter(model, config, name)
    copy_into(vera_tensors(model, name), tensors)
    if not is_trainable:
        for _, layer in _vera_layers(model, name):
            layer.vera_lambda_b[name].requires_grad_(False)
            layer.vera_lambda_d[name].requires_grad_(False)
        freeze_saved_modules(model, name)
    return model


__all__ = ["add_adapter", "adapter_state_dict", "save_adapter", "load_adapter", "expected_shapes", "vera_tensors"]
