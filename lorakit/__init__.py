"""lorakit: LoRA and QLoRA fine-tuning of PyTorch models, PEFT-compatible, bitsandbytes-exact."""

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
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
from lorakit.peft_format import adapter_state_dict, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LorakitError", "active_adapters", "add_adapter", "adapter_state_dict", "delete_adapter",
    "disable_adapters", "format_trainable_parameters", "load_adapter", "merge_adapters",
    "print_trainable_parameters", "resolve_targets", "save_adapter", "set_adapter",
    "trainable_base_parameters", "trainable_parameters", "unload", "unmerge_adapters",
]
