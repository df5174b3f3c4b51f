"""Save a LoftQ-initialised model the way PEFT's LoftQ recipe lays it out (examples/loftq_finetuning).

    out_dir/              the backbone: the base weights are deq(Q), the adapters left out (not merged)
    out_dir/loftq_init/   the adapter, with init_lora_weights=true so that loading never reruns LoftQ

Then `AutoModelForCausalLM.from_pretrained(out_dir)` (quantized to NF4, blocksize 64, no double
quantization: bitsandbytes or lorakit.quantize_model) plus the adapter from out_dir/loftq_init is the
LoftQ start point, in PEFT (`PeftModel.from_pretrained`) or lorakit (`load_adapter`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from lorakit.errors import LorakitError
from lorakit.inject import adapter_configs
from lorakit.lora import LoraLayer, ModulesToSave
from lorakit.peft_format import CONFIG_NAME, save_adapter

ADAPTER_SUBFOLDER = "loftq_init"  # the recipe's README and the LoftQ models on the Hub use this name


def save_loftq(model: nn.Module, out_dir: str | os.PathLike, name: str = "default", tokenizer: Any = None) -> Path:
    """Write the backbone to out_dir and adapter `name` to out_dir/loftq_init; atomic, the model is left unchanged.

    out_dir must be new, empty, or an earlier save_loftq folder: the whole folder is replaced.
    """
    out = Path(out_dir)
    _check_model(model, name)
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_adapter(model, tmp / ADAPTER_SUBFOLDER, name)
        _mark_initialised(tmp / ADAPTER_SUBFOLDER / CONFIG_NAME, out)
        with _adapters_removed(model):
            _save_backbone(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_model(model: nn.Module, name: str) -> None:
    if name not in adapter_configs(model):
        raise LorakitError(f"save_loftq: no adapter named {name!r}; this model has "
                           f"{sorted(adapter_configs(model)) or 'none'}")
    merged = sorted({n for m in model.modules() if isinstance(m, LoraLayer) for n in m.merged_adapters})
    if merged:
        raise LorakitError(f"save_loftq: adapter(s) {merged} are merged into the base weights, so the backbone "
                           "would not be LoftQ's Q; call unmerge_adapters(model) first")


def _check_out_dir(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise LorakitError(f"save_loftq: {out} is a file; give a folder path")
    if any(out.iterdir()) and not (out / ADAPTER_SUBFOLDER / CONFIG_NAME).is_file():
        raise LorakitError(f"save_loftq: {out} holds other files, and save_loftq replaces the whole folder; "
                           "give a new or empty folder (or one save_loftq wrote before)")


def _mark_initialised(config_file: Path, out: Path) -> None:
    """The recipe's edits: load as a plain LoRA (never rerun LoftQ), and name the backbone folder."""
    data = json.loads(config_file.read_text())
    data["init_lora_weights"] = True
    data["base_model_name_or_path"] = os.fspath(out)
    # PEFT keeps loftq_config here; lorakit refuses a loftq_config without init 'loftq', so it is PEFT's default.
    data["loftq_config"] = {}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True))


@contextmanager
def _adapters_removed(model: nn.Module) -> Iterator[None]:
    """The model with each adapter wrapper swapped for the module it wraps (not merged); restored on exit."""
    wrappers = [(path, module) for path, module in model.named_modules()
                if isinstance(module, (LoraLayer, ModulesToSave))]
    try:
        for path, module in wrappers:
            inner = module.base_layer if isinstance(module, LoraLayer) else module.original_module
            _set_child(model, path, inner)
        yield
    finally:
        for path, module in wrappers:
            _set_child(model, path, module)


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _save_backbone(model: nn.Module, folder: Path) -> None:
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(folder)  # a transformers model: config.json + model.safetensors, as the recipe
    else:
        save_model(model, str(folder / "model.safetensors"))  # handles tied (shared) tensors


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder at `out` by renames: `out` is never a half-written folder, only the old or the new."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old)  # onto the empty folder mkdtemp made
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["ADAPTER_SUBFOLDER", "save_loftq"]
