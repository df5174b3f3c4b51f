"""lorakit: LoRA and QLoRA fine-tuning of PyTorch models, PEFT-compatible, bitsandbytes-exact."""

from lorakit.adalora import AdaLoraConfig
from lorakit.adalora_budget import orthogonal_regularization, update_and_allocate
from lorakit.config import LoraConfig
from lorakit.constants import DEFAULT_MODEL
from lorakit.errors import LorakitError
from lorakit.fast_training import disable_fast_training, enable_fast_training, use_fast_cpu_attention
from lorakit.inject import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    format_trainable_parameters,
    merge_adapters,
    print_trainable_parameters,
    resolve_targets,
    set_adapter,
    trainable_base_parameters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from lorakit.loftq_save import save_loftq
from lorakit.peft_format import adapter_state_dict, load_adapter, save_adapter
from lorakit.quant import QuantConfig, quantize_model
from lorakit.vera import VeraConfig


def load_model(spec: str = DEFAULT_MODEL, **kwargs):
    """(model, tokenizer) from the embedded name, a HF folder, a .gguf or a .safetensors file."""
    from lorakit.models import load_model as _load_model  # transformers is imported only when needed

    return _load_model(spec, **kwargs)


def __getattr__(name: str):
    """`lk.AdapterCallback` and `lk.Engine` are imported only when asked for."""
    if name == "AdapterCallback":
        from lorakit.hf_callback import AdapterCallback

        return AdapterCallback
    if name == "Engine":
        from lorakit.serve.engine import Engine

        return Engine
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterCallback",
    "Engine",
    "LoraConfig",
    "LorakitError",
    "QuantConfig",
    "VeraConfig",
    "active_adapters",
    "adapter_state_dict",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "disable_fast_training",
    "enable_fast_training",
    "format_trainable_parameters",
    "load_adapter",
    "load_model",
    "merge_adapters",
    "orthogonal_regularization",
    "print_trainable_parameters",
    "quantize_model",
    "resolve_targets",
    "save_adapter",
    "save_loftq",
    "set_adapter",
    "trainable_base_parameters",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
    "update_and_allocate",
    "use_fast_cpu_attention",
]
