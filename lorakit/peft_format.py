"""PEFT adapter folders (adapter_config.json + adapter_model.safetensors) <-> lorakit adapters."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorakit.adapter_types import AdapterConfig, config_from_peft_dict, handler_for
from lorakit.config import BASE_CHANGING_INITS, TARGET_SHORTHANDS, LoraConfig, peft_config_dict
from lorakit.errors import LorakitError, LorakitWarning
from lorakit.fingerprint import base_fingerprint
from lorakit.inject import _modules_to_save_targets, adapter_configs, add_adapter, resolve_targets
from lorakit.lora import LoraEmbedding, LoraLayer, ModulesToSave, is_conv1d
from lorakit.peft_keys import MAGNITUDE, factor_params, peft_key, saved_bias_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FINGERPRINT_KEY = "lorakit.base_fingerprint"  # safetensors metadata; PEFT reads only "format"
BASE_NAME_KEY = "lorakit.base_model"


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's saved key names (adapter name stripped)."""
    handler = handler_for(_config(model, name))
    if handler is not None:
        return handler.adapter_state_dict(model, name)
    tensors = adapter_tensors(model, name, _config(model, name).bias)
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def adapter_tensors(model: nn.Module, name: str, bias: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s live tensors by saved key: what save writes and load fills."""
    tensors: dict[str, torch.Tensor] = {}
    adapted: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            adapted.add(path)
            keys = (peft_key(path, param) for param in factor_params(isinstance(module, LoraEmbedding)))
            tensors.update(zip(keys, _factors(module, name)))
            if name in getattr(module, "lora_magnitude_vector", {}):
                tensors[peft_key(path, MAGNITUDE)] = module.lora_magnitude_vector[name].weight
    return {**tensors, **saved_extras(model, name, adapted, bias)}


def saved_extras(model: nn.Module, name: str, adapted: set[str], bias: str) -> dict[str, torch.Tensor]:
    """What every adapter kind saves beside its own tensors: modules_to_save copies and the carried base biases."""
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for param, tensor in module.modules_to_save[name].state_dict(keep_vars=True).items():
                tensors[peft_key(path, param)] = tensor
    params = dict(model.named_parameters())
    tensors.update((key, params[param]) for param, key in saved_bias_names(params, adapted, bias).items())
    return tensors


def saved_extra_shapes(model: nn.Module, config, adapted: set[str], bias: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of `saved_extras` an adapter with `config` writes (VeRA, AdaLoRA): for checking a file."""
    shapes = modules_to_save_shapes(model, config)
    params = dict(model.named_parameters())
    shapes.update((key, tuple(params[param].shape)) for param, key in saved_bias_names(params, adapted, bias).items())
    return shapes


def freeze_saved_modules(model: nn.Module, name: str) -> None:
    """Make adapter `name`'s modules_to_save copies untrainable (a load without is_trainable)."""
    for module in model.modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            module.modules_to_save[name].requires_grad_(False)


def tuner_config_dict(model: nn.Module, name: str, peft_type: str, layers: list[tuple[str, nn.Module]]) -> dict:
    """adapter_config.json for a VeRA or AdaLoRA adapter: its fields, resolved targets, PEFT's bookkeeping keys."""
    data = _config(model, name).to_dict()
    data.update(target_modules=saved_target_modules(model, name), peft_type=peft_type, inference_mode=True,
                revision=None)
    # PEFT switches fan_in_fan_out on for Conv1D targets (GPT-2) and saves it so.
    data["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    if data.get("base_model_name_or_path") is None:
        data["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    return data


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter `name`'s A and B of one adapted layer (Embedding LoRA keeps bare parameters)."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _config(model: nn.Module, name: str) -> LoraConfig:
    configs = adapter_configs(model)
    if name not in configs:
        raise LorakitError(f"no adapter named {name!r}; this model has {sorted(configs) or 'none'}")
    return configs[name]


def saved_target_modules(model: nn.Module, name: str) -> list[str] | str | None:
    """target_modules as written to disk: shorthands resolved to full names, as PEFT >= 0.15 does."""
    targets = _config(model, name).target_modules
    if isinstance(targets, str) and targets not in TARGET_SHORTHANDS:
        return targets
    if targets is None or isinstance(targets, str):
        return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.scaling)
    return targets


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` as a PEFT folder that `peft.PeftModel.from_pretrained` loads; atomic."""
    handler = handler_for(_config(model, name))
    if handler is not None:
        return handler.save_adapter(model, path, name)
    config = _config(model, name)
    data = peft_config_dict(config, saved_target_modules(model, name))
    if any(getattr(m, "fan_in_fan_out", False) and name in m.scaling for m in model.modules()
           if isinstance(m, LoraLayer)):
        # PEFT flips this on for Conv1D targets (GPT-2) and saves it so; loading warns otherwise.
        data["fan_in_fan_out"] = True
    if data.get("base_model_name_or_path") is None:
        data["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    return write_adapter_folder(model, path, data, adapter_state_dict(model, name))


def write_adapter_folder(model: nn.Module, path: str | os.PathLike, config_dict: dict,
                         tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into `path`, atomically (for every adapter kind)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        Path(tmp, WEIGHTS_NAME).write_bytes(deterministic_safetensors(tensors, base_metadata(model)))
        Path(tmp, CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        os.replace(os.path.join(tmp, WEIGHTS_NAME), out / WEIGHTS_NAME)
        os.replace(os.path.join(tmp, CONFIG_NAME), out / CONFIG_NAME)
    return out


def deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes whose header lists its keys sorted, so equal tensors give equal files.

    safetensors writes the metadata map in a per-process random order; the header is re-serialized with
    sorted keys (same length: same entries, same compact JSON) and padded as before, so the offsets hold.
    """
    data = safetensors_bytes(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:
        raise AssertionError("re-serialized safetensors header grew")  # same entries, so it cannot
    return data[:8] + text.ljust(length, b" ") + data[8 + length:]


def base_metadata(model: nn.Module) -> dict[str, str]:
    """The safetensors header metadata lorakit writes: PEFT's format tag and what identifies the base."""
    metadata = {"format": "pt"}
    fingerprint = base_fingerprint(model)
    if fingerprint is not None:
        metadata[FINGERPRINT_KEY] = fingerprint
    base_name = getattr(model, "lorakit_spec", None) or getattr(model, "name_or_path", None)
    if base_name:
        metadata[BASE_NAME_KEY] = str(base_name)
    return metadata


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of an adapter folder ({} when it has none)."""
    file = Path(path)
    file = file / WEIGHTS_NAME if file.is_dir() else file
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise LorakitError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def check_base(model: nn.Module, folder: Path) -> str | None:
    """A warning message when the adapter in `folder` was saved on a base with other weights, else None."""
    metadata = read_adapter_metadata(folder)
    saved = metadata.get(FINGERPRINT_KEY)
    if saved is None:
        return None  # saved by PEFT or an older lorakit: nothing to compare
    current = base_fingerprint(model)
    if current is None or current == saved:
        return None
    trained_on = metadata.get(BASE_NAME_KEY, "an unnamed base")
    return (f"{folder}: this adapter was trained on a base with other weights ({trained_on}, fingerprint "
            f"{saved}; this model's is {current}); it loads, but its outputs will not be the ones it was trained "
            "for: use the base it was trained on")


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """Parse and validate a PEFT adapter_config.json (a folder or the file itself): a LoRA, VeRA or AdaLoRA config."""
    file = Path(path)
    file = file / CONFIG_NAME if file.is_dir() else file
    if not file.is_file():
        raise LorakitError(f"{file}: no such file; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{file}: not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{file}: expected a JSON object, got {type(data).__name__}")
    try:
        return config_from_peft_dict(data, str(file))
    except TypeError as exc:
        raise LorakitError(f"{file}: {exc}") from None
    except LorakitError as exc:
        msg = str(exc)
        raise LorakitError(msg if msg.startswith(str(file)) else f"{file}: {msg}") from None


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load adapter_model.safetensors (never a pickle), with a clear error for a bad file."""
    file = Path(path)
    file = file / WEIGHTS_NAME if file.is_dir() else file
    if not file.is_file():
        bin_file = file.with_name("adapter_model.bin")
        hint = " (a pickled adapter_model.bin is not loaded, for safety: re-save with safetensors)" \
            if bin_file.is_file() else ""
        raise LorakitError(f"{file}: no such file{hint}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LorakitError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def expected_adapter_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The saved keys and shapes an adapter with `config` must have on `model`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in resolve_targets(model, config):
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        keys = (peft_key(path, param) for param in factor_params(isinstance(base, nn.Embedding)))
        factor_shapes = _factor_shapes(base, config.rank_for(path))
        shapes.update(zip(keys, factor_shapes))
        if config.use_dora:
            shapes[peft_key(path, MAGNITUDE)] = (factor_shapes[1][0],)
    return {**shapes, **modules_to_save_shapes(model, config)}


def modules_to_save_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """The saved keys and shapes of the modules_to_save copies an adapter with `config` carries (every kind)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _modules_to_save_targets(model, config):
        module = model.get_submodule(path)
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for param, tensor in original.state_dict().items():
            shapes[peft_key(path, param)] = tuple(tensor.shape)
    return shapes


def copy_into(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy a file's checked tensors into the adapter's live ones of the same saved keys (device and dtype kept)."""
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key].copy_(tensor.to(device=own[key].device, dtype=own[key].dtype))


def _factor_shapes(base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B of a rank-`r` LoRA on the (unwrapped) layer `base`."""
    if isinstance(base, nn.Embedding):
        return (r, base.num_embeddings), (base.embedding_dim, r)
    if isinstance(base, nn.Conv2d):
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)
    fan_in, fan_out = tuple(base.weight.shape) if is_conv1d(base) else (base.in_features, base.out_features)
    return (r, fan_in), (fan_out, r)


def optional_bias_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Base-bias keys an adapter with bias='all'/'lora_only' may carry, named as after wrapping."""
    params = dict(model.named_parameters())
    saved = saved_bias_names(params, set(resolve_targets(model, config)), config.bias)
    return {key: tuple(params[param].shape) for param, key in saved.items()}


def _check_tensors(file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                   model: nn.Module, config: LoraConfig) -> None:
    biases = optional_bias_shapes(model, config)
    for key, shape in expected.items():
        if key not in tensors:
            raise LorakitError(f"{file}: missing key {key!r}: the adapter was made for another model "
                               f"or other target_modules")
        if tuple(tensors[key].shape) != shape:
            raise LorakitError(f"{file}: key {key!r} has shape {tuple(tensors[key].shape)}, "
                               f"the model needs {shape}: the adapter was made for another model")
    for key, tensor in tensors.items():
        if key in expected:
            continue
        if biases.get(key) == tuple(tensor.shape):
            continue
        raise LorakitError(f"{file}: unexpected key {key!r}: the model has no matching adapter slot")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise LorakitError(f"{file}: key {key!r} has dtype {tensor.dtype}; adapter weights are floats")


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT (or lorakit) adapter folder as adapter `name`; the model is unchanged on error."""
    folder = Path(path)
    if not folder.is_dir():
        raise LorakitError(f"{folder}: not a folder; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if name in adapter_configs(model):
        raise LorakitError(f"adapter {name!r} already exists on this model; pick another name or delete it")
    config = read_adapter_config(folder)
    handler = handler_for(config)
    if handler is not None:
        return handler.load_adapter(model, folder, config, name, is_trainable)
    tensors = read_adapter_tensors(folder)
    try:
        expected = expected_adapter_shapes(model, config)
    except LorakitError as exc:
        raise LorakitError(f"{folder / CONFIG_NAME}: {exc}") from None
    _check_tensors(folder / WEIGHTS_NAME, tensors, expected, model, config)
    mismatch = check_base(model, folder)
    if mismatch:
        warnings.warn(mismatch, LorakitWarning, stacklevel=2)
    # The file holds the final weights: an init that rewrites the base (PiSSA, OLoRA, LoftQ) must not run again.
    fresh = dataclasses.replace(config, init_lora_weights=True, loftq_config={}) \
        if config.init_lora_weights in BASE_CHANGING_INITS or str(config.init_lora_weights).startswith("pissa") \
        else config
    add_adapter(model, fresh, name)
    adapter_configs(model)[name] = config
    copy_into(adapter_tensors(model, name, config.bias), tensors)
    if not is_trainable:
        for key, param in model.named_parameters():
            if f".{name}." in f"{key}." and any(p in key for p in ("lora_", "modules_to_save")):
                param.requires_grad_(False)
    return model


__all__ = [
    "adapter_state_dict", "save_adapter", "load_adapter", "read_adapter_config", "read_adapter_tensors",
    "expected_adapter_shapes", "read_adapter_metadata", "check_base",
]
