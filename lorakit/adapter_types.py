"""Which kind of adapter a config or a PEFT file describes (LORA, VERA, ADALORA), and who handles it.

Plain LoRA is handled where it always was (inject.py, peft_format.py); the public functions there call
`handler_for` first and hand any other kind to its own module, which exposes the same four functions:
`add_adapter(model, config, name)`, `adapter_state_dict(model, name)`, `save_adapter(model, path, name)` and
`load_adapter(model, folder, config, name, is_trainable)`. One model holds adapters of one kind, as in PEFT.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lorakit.adalora import AdaLoraConfig, adalora_config_from_peft_dict
from lorakit.config import LoraConfig
from lorakit.config import config_from_peft_dict as lora_config_from_peft_dict
from lorakit.errors import LorakitError
from lorakit.vera import VeraConfig

# Imported on first use: these modules sit above inject.py and peft_format.py, which call this one.
_HANDLERS = {"VERA": "lorakit.vera_adapter", "ADALORA": "lorakit.adalora_adapter"}
AdapterConfig = LoraConfig | VeraConfig | AdaLoraConfig


def adapter_kind(config: Any) -> str:
    """PEFT's peft_type of a lorakit config: 'LORA', 'VERA' or 'ADALORA'."""
    if isinstance(config, LoraConfig):
        return "LORA"
    if isinstance(config, AdaLoraConfig):
        return "ADALORA"
    if isinstance(config, VeraConfig):
        return "VERA"
    raise LorakitError(f"expected a lorakit LoraConfig, VeraConfig or AdaLoraConfig, got {type(config).__name__}")


def handler_for(config: Any, existing: Mapping[str, Any] | None = None) -> ModuleType | None:
    """The module handling `config`'s kind (None for plain LoRA); with `existing`, refuse mixing kinds."""
    kind = adapter_kind(config)
    for name, other in (existing or {}).items():
        if adapter_kind(other) != kind:
            raise LorakitError(f"this model holds {adapter_kind(other)} adapter {name!r}; lorakit keeps one adapter "
                               f"kind per model (as PEFT does): delete_adapter({name!r}) first to add a {kind} one")
    return importlib.import_module(_HANDLERS[kind]) if kind in _HANDLERS else None


def config_from_peft_dict(data: dict[str, Any], where: str) -> AdapterConfig:
    """Read a PEFT adapter_config.json dict into the config of its peft_type."""
    peft_type = data.get("peft_type")
    if peft_type == "VERA":
        return VeraConfig.from_dict(_listed_targets(data), strict=False, where=where)
    if peft_type == "ADALORA":
        return adalora_config_from_peft_dict(data, where)
    if peft_type != "LORA":
        raise LorakitError(f"{where}: peft_type is {peft_type!r}; lorakit loads 'LORA', 'VERA' and 'ADALORA' adapters")
    return lora_config_from_peft_dict(data, where)


def _listed_targets(data: dict[str, Any]) -> dict[str, Any]:
    # PEFT writes sets as lists in set-iteration order; sorted, equal configs compare equal.
    if isinstance(data.get("target_modules"), list):
        return {**data, "target_modules": sorted(data["target_modules"])}
    return data


def check_saved_tensors(file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a file whose keys or shapes are not exactly `expected`, or whose tensors are not floats."""
    for key, shape in expected.items():
        if key not in tensors:
            raise LorakitError(f"{file}: missing key {key!r}: the adapter was made for another model or other "
                               "target_modules")
        if tuple(tensors[key].shape) != shape:
            raise LorakitError(f"{file}: key {key!r} has shape {tuple(tensors[key].shape)}, the model needs "
                               f"{shape}: the adapter was made for another model or with other ranks")
    for key, tensor in tensors.items():
        if key not in expected:
            raise LorakitError(f"{file}: unexpected key {key!r}: the model has no matching adapter slot")
        if not tensor.is_floating_point():
            raise LorakitError(f"{file}: key {key!r} has dtype {tensor.dtype}; adapter weights are floats")
