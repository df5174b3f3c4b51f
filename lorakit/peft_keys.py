"""PEFT's saved state-dict key names, and its bias rule: pure functions over names, used by save, load,
the shape check, freezing and `lorakit inspect` alike (reference: peft `utils/save_and_load.py`)."""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "base_model.model."  # PeftModel.base_model is the LoraModel, whose .model is the user's model
# A Linear or Conv2d LoRA saves its factors as modules (".weight"); an Embedding LoRA as bare parameters.
LINEAR_FACTORS = ("lora_A.weight", "lora_B.weight")
EMBEDDING_FACTORS = ("lora_embedding_A", "lora_embedding_B")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, saved without the adapter name and without ".weight"
# Base biases inside these are the wrapper's copies, never saved as base biases.
_COPIES = (".modules_to_save.", ".original_module.")


def peft_key(module_path: str, param: str) -> str:
    """The saved key of `param` (e.g. "lora_A.weight") of the module at `module_path`; no adapter name."""
    return f"{PREFIX}{module_path}.{param}"


def factor_params(embedding: bool) -> tuple[str, str]:
    """The parameter names of A and B for an Embedding LoRA or for a Linear/Conv2d one."""
    return EMBEDDING_FACTORS if embedding else LINEAR_FACTORS


def parse_peft_key(key: str) -> tuple[str, str] | None:
    """(module path, factor param) of a saved LoRA factor key, None for any other key; the prefix is optional."""
    for param in (*LINEAR_FACTORS, *EMBEDDING_FACTORS):
        if key.endswith("." + param):
            return key.removeprefix(PREFIX)[: -len(param) - 1], param
    return None


def saved_bias_names(param_names: Iterable[str], adapted: set[str], bias: str) -> dict[str, str]:
    """PEFT's bias rule: model parameter name -> saved key of each base bias an adapter carries.

    bias="none" carries none, "all" every base bias, "lora_only" those of the `adapted` module paths. An
    adapted layer's bias is saved as `<path>.base_layer.bias`, whether or not the layer is wrapped yet.
    """
    if bias == "none":
        return {}
    names: dict[str, str] = {}
    for name in param_names:
        if not name.endswith(".bias") or any(copy in name for copy in _COPIES):
            continue
        owner = name.removesuffix(".bias").removesuffix(".base_layer")
        if owner in adapted:
            names[name] = peft_key(owner, "base_layer.bias")
        elif bias == "all":
            names[name] = PREFIX + name
    return names
