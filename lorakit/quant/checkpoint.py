"""4-bit checkpoints: lorakit's own safetensors file, and bitsandbytes/transformers state dicts.

lorakit's file holds the model's `state_dict()` as is (Linear4bit buffers included) plus, in the
safetensors metadata, one JSON record per quantized layer (shape, dtypes, quant settings), so a float
or meta-device model of the same architecture can be rebuilt from the file alone.

The bitsandbytes layout (what transformers writes for `load_in_4bit=True`, facts §2.7) stores each
layer as `<prefix>.weight` (packed uint8), `.weight.absmax`, `.weight.quant_map`, and when nested
`.weight.nested_absmax` / `.weight.nested_quant_map`, plus a uint8 JSON blob
`.weight.quant_state.bitsandbytes__<nf4|fp4>` with the non-tensor fields.

Every loader validates the whole file against the model before touching it: a bad file raises
LorakitError naming the file and the first bad key, and leaves the model unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.constants import QUANT_TYPES
from lorakit.errors import LorakitError
from lorakit.quant.linear4bit import Linear4bit, parse_compute_dtype
from lorakit.quant.nf4 import QuantState

FORMAT = "lorakit-4bit/1"
_BNB_BLOB = ".weight.quant_state.bitsandbytes__"
# lorakit buffer name -> bitsandbytes state-dict suffix under "<prefix>."
_BNB_NAMES = {"packed": "weight", "absmax": "weight.absmax", "quant_map": "weight.quant_map",
              "nested_absmax": "weight.nested_absmax", "nested_quant_map": "weight.nested_quant_map"}


def _dtype_name(dtype: torch.dtype) -> str:
    # Exactly bitsandbytes' QuantState.as_dict spelling (str.strip removes characters, not a prefix).
    return str(dtype).strip("torch.")


def _parse_dtype(name: object, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise LorakitError(f"{where}: {name!r} is not a torch dtype")
    return dtype


def layer_record(layer: Linear4bit) -> dict:
    """The JSON-able description of a Linear4bit that, with its tensors, rebuilds it."""
    nested = layer.nested_blocksize is not None
    return {
        "shape": [layer.out_features, layer.in_features], "dtype": _dtype_name(layer.weight_dtype),
        "quant_type": layer.quant_type, "blocksize": layer.blocksize, "bias": layer.bias is not None,
        "compute_dtype": _dtype_name(layer.compute_dtype), "nested": nested,
        "nested_blocksize": layer.nested_blocksize if nested else None,
        "nested_dtype": _dtype_name(layer.nested_dtype) if nested else None,
    }


def _expected(record: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Buffer name -> (shape, dtype) that a layer described by `record` must have."""
    n = math.prod(record["shape"])
    nblocks = -(-n // record["blocksize"])
    specs = {"packed": (((n + 1) // 2, 1), torch.uint8), "quant_map": ((16,), torch.float32)}
    if record["nested"]:
        nested_blocks = -(-nblocks // record["nested_blocksize"])
        specs |= {
            "absmax": ((nblocks,), torch.uint8),
            "nested_absmax": ((nested_blocks,), torch.float32),
            "nested_quant_map": ((256,), torch.float32),
        }
    else:
        specs["absmax"] = ((nblocks,), torch.float32)
    return specs


def _check_record(record: object, name: str, where: str) -> dict:
    keys = ("shape", "dtype", "quant_type", "blocksize", "nested")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise LorakitError(f"{where}: the quantization record of {name!r} lacks one of {keys}")
    shape = record["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise LorakitError(f"{where}: {name!r} has shape {shape!r}; expected [out_features, in_features]")
    if record["quant_type"] not in QUANT_TYPES or not isinstance(record["blocksize"], int):
        raise LorakitError(
            f"{where}: {name!r} has quant_type {record['quant_type']!r} / blocksize "
            f"{record['blocksize']!r}; expected nf4/fp4 and an integer"
        )
    if record["nested"] and not isinstance(record.get("nested_blocksize"), int):
        raise LorakitError(f"{where}: {name!r} is nested but has no integer nested_blocksize")
    return record


def _check_tensor(
    tensors: dict, key: str, shape: tuple[int, ...] | None, dtype: torch.dtype | None, where: str
) -> torch.Tensor:
    if key not in tensors:
        raise LorakitError(f"{where}: tensor {key!r} is missing; the file is truncated or not for this model")
    value = tensors[key]
    if shape is not None and tuple(value.shape) != tuple(shape) and value.numel() != math.prod(shape):
        raise LorakitError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise LorakitError(f"{where}: tensor {key!r} has dtype {value.dtype}, expected {dtype}")
    return value


def _target_linear(model: nn.Module, name: str, record: dict, where: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise LorakitError(
            f"{where}: layer {name!r} is not in the model; load into the same architecture"
        ) from None
    if not isinstance(module, (nn.Linear, Linear4bit)):
        raise LorakitError(
            f"{where}: {name!r} is a {type(module).__name__}, expected nn.Linear or Linear4bit"
        )
    if [module.out_features, module.in_features] != list(record["shape"]):
        raise LorakitError(
            f"{where}: {name!r} is {module.out_features}x{module.in_features} in the model but "
            f"{record['shape'][0]}x{record['shape'][1]} in the file"
        )
    return module


def _lorakit_key_for(prefix: str) -> Callable[[str], str]:
    return lambda name: f"{prefix}.{name}"


def _bnb_key_for(prefix: str) -> Callable[[str], str]:
    return lambda name: (
        f"{prefix}.{_BNB_NAMES.get(name, 'weight.' + name)}" if name != "bias" else f"{prefix}.bias"
    )


def _build_layer(
    tensors: dict, key_for: Callable[[str], str], record: dict, compute_dtype: torch.dtype, where: str
) -> Linear4bit:
    """A Linear4bit from validated tensors; `key_for(buffer name)` spells the key in `tensors`."""
    parts = {
        name: _check_tensor(tensors, key_for(name), shape, dtype, where)
        for name, (shape, dtype) in _expected(record).items()
    }
    state2, offset = None, None
    if record["nested"]:
        offset = _check_tensor(tensors, key_for("nested_offset"), (), torch.float32, where).reshape(())
        state2 = QuantState(
            absmax=parts["nested_absmax"].reshape(-1), shape=parts["absmax"].shape,
            dtype=_parse_dtype(record.get("nested_dtype", "float32"), where),
            blocksize=record["nested_blocksize"], quant_type="dynamic",
            code=parts["nested_quant_map"].reshape(-1),
        )
    state = QuantState(
        absmax=parts["absmax"].reshape(-1), shape=torch.Size(record["shape"]),
        dtype=_parse_dtype(record["dtype"], where), blocksize=record["blocksize"],
        quant_type=record["quant_type"], code=parts["quant_map"].reshape(-1), offset=offset, state2=state2,
    )
    bias = None
    if record.get("bias"):
        bias = _check_tensor(tensors, key_for("bias"), (record["shape"][0],), None, where)
    return Linear4bit(parts["packed"].reshape(-1, 1), state, bias, compute_dtype)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """State-dict key -> the keys of tensors tied to it (same Parameter object), itself included."""
    groups: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(key)
    return {key: keys for keys in groups.values() for key in keys}


def _plan_plain(
    model: nn.Module, tensors: dict, quantized: set[str], where: str
) -> list[tuple[str, torch.Tensor]]:
    """Validate the non-quantized tensors against the model: (model key, file tensor) to load."""

    def under_quantized(key: str) -> bool:
        return key.rpartition(".")[0] in quantized

    model_tensors = model.state_dict(keep_vars=True)
    aliases = _aliases(model)
    plan, used = [], set()
    for key, current in model_tensors.items():
        if under_quantized(key):
            continue
        source = key if key in tensors else next((k for k in aliases[key] if k in tensors), None)
        if source is None:
            raise LorakitError(
                f"{where}: tensor {key!r} is missing; the file is truncated or not for this model"
            )
        value = tensors[source]
        if value.shape != current.shape:
            raise LorakitError(
                f"{where}: tensor {source!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(current.shape)}"
            )
        plan.append((key, value))
        used.add(source)
    for key in tensors:
        if key not in used and not any(key.startswith(name + ".") for name in quantized):
            raise LorakitError(
                f"{where}: tensor {key!r} is not part of the model; load into the same architecture"
            )
    return plan


def _apply_plain(model: nn.Module, plan: list[tuple[str, torch.Tensor]]) -> None:
    """Copy each tensor into the model; meta tensors are replaced (ties kept: one new Parameter per old)."""
    replaced: dict[int, torch.Tensor] = {}
    for key, value in plan:
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, attr)
        if not current.is_meta:
            with torch.no_grad():
                current.copy_(value)
            continue
        if id(current) not in replaced:
            new = value.to(current.dtype)
            if isinstance(current, nn.Parameter):
                new = nn.Parameter(new, requires_grad=current.requires_grad)
            replaced[id(current)] = new
        target = owner._parameters if attr in owner._parameters else owner._buffers
        target[attr] = replaced[id(current)]


def _swap_layers(model: nn.Module, layers: dict[str, Linear4bit]) -> None:
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        devices = [t.device for t in [*old.parameters(), *old.buffers()] if not t.is_meta]
        setattr(parent, child, layer.to(devices[0] if devices else torch.device("cpu")))


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write (contiguous, no shared storage) and the tied keys left out."""
    out, aliases, views, storages = {}, {}, {}, set()
    for key, value in state.items():
        value = value.detach()
        storage = value.untyped_storage().data_ptr() if value.numel() else None
        view = (storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if storage is not None and view in views:
            aliases[key] = views[view]  # tied (e.g. lm_head = embeddings): stored once, restored on load
            continue
        views[view] = key
        out[key] = value.clone() if storage in storages else value.contiguous()
        storages.add(storage)
    return out, aliases


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        if tmp.exists():
            tmp.unlink()


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a quantized model to one safetensors file (atomically); returns the path."""
    path = Path(path)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise LorakitError(
            f"save_quantized({path}): the model has no Linear4bit layer; run quantize_model first"
        )
    tensors, aliases = _dedupe({k: v.cpu() for k, v in model.state_dict().items()})
    records = {name: layer_record(layer) for name, layer in layers.items()}
    metadata = {"format": "pt", "lorakit_format": FORMAT, "lorakit_quant_layers": json.dumps(records),
                "lorakit_aliases": json.dumps(aliases)}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, path, metadata)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    where = f"load_quantized({path})"
    if not path.is_file():
        raise LorakitError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError / OSError on bad bytes
        raise LorakitError(
            f"{where}: not a valid safetensors file ({str(err).splitlines()[0]}); "
            "it is truncated or corrupted, write it again"
        ) from None
    return tensors, metadata


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by save_quantized: recorded layers become Linear4bit, the rest is loaded."""
    path = Path(path)
    where = f"load_quantized({path})"
    tensors, metadata = _read_safetensors(path)
    if metadata.get("lorakit_format") != FORMAT:
        raise LorakitError(
            f"{where}: not a lorakit 4-bit checkpoint (metadata lorakit_format="
            f"{metadata.get('lorakit_format')!r}, expected {FORMAT!r}); for a bitsandbytes/"
            "transformers file use load_bnb_state_dict"
        )
    try:
        records = json.loads(metadata["lorakit_quant_layers"])
        aliases = json.loads(metadata.get("lorakit_aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise LorakitError(f"{where}: the layer records in the metadata are unreadable ({err})") from None
    for key, source in aliases.items():
        tensors[key] = _check_tensor(tensors, source, None, None, where)
    layers = {}
    for name, record in records.items():
        record = _check_record(record, name, where)
        _target_linear(model, name, record, where)
        compute_dtype = parse_compute_dtype(record.get("compute_dtype", "bfloat16"), f"{where}: {name}")
        layers[name] = _build_layer(tensors, _lorakit_key_for(name), record, compute_dtype, where)
        extra = set(k for k in tensors if k.startswith(name + ".")) - {
            name + "." + b for b in layers[name]._buffers
        }
        extra -= {name + ".bias"} if record.get("bias") else set()
        if extra:
            raise LorakitError(f"{where}: tensor {sorted(extra)[0]!r} is not part of layer {name!r}")
    plan = _plan_plain(model, tensors, set(layers), where)
    _swap_layers(model, layers)  # nothing above touched the model; from here on nothing can fail
    _apply_plain(model, plan)
    return model


def to_bnb_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each Linear4bit in bitsandbytes' serialized layout (facts §2.7)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix = key.rpartition(".")[0]
        if prefix not in layers:
            out[key] = value
        elif prefix + ".weight" not in out:
            out |= _bnb_layer_tensors(layers[prefix], prefix + ".")
    return out


def _bnb_layer_tensors(layer: Linear4bit, prefix: str) -> dict[str, torch.Tensor]:
    # Key order and blob fields as bitsandbytes' Linear4bit._save_to_state_dict writes them.
    out = {prefix + "weight": layer.packed.detach()}
    if layer.bias is not None:
        out[prefix + "bias"] = layer.bias.detach()
    out[prefix + "weight.absmax"] = layer.absmax.detach()
    out[prefix + "weight.quant_map"] = layer.quant_map.detach().clone()  # unshared, safetensors-safe
    blob = {"quant_type": layer.quant_type, "blocksize": layer.blocksize,
            "dtype": _dtype_name(layer.weight_dtype), "shape": [layer.out_features, layer.in_features]}
    if layer.nested_blocksize is not None:
        out[prefix + "weight.nested_absmax"] = layer.nested_absmax.detach()
        out[prefix + "weight.nested_quant_map"] = layer.nested_quant_map.detach().clone()
        blob |= {"nested_blocksize": layer.nested_blocksize, "nested_dtype": _dtype_name(layer.nested_dtype),
                 "nested_offset": layer.nested_offset.item()}
    text = json.dumps(blob).encode("utf-8")
    out[f"{prefix}weight.quant_state.bitsandbytes__{layer.quant_type}"] = torch.tensor(
        list(text), dtype=torch.uint8
    )
    return out


def _bnb_record(state_dict: dict, blob_key: str, where: str) -> tuple[str, dict]:
    """(layer prefix, lorakit layer record) from one `...quant_state.bitsandbytes__*` blob."""
    prefix = blob_key[: blob_key.index(_BNB_BLOB)]
    try:
        blob = json.loads(
            bytes(state_dict[blob_key].to(torch.uint8).cpu().reshape(-1).tolist()).decode("utf-8")
        )
        record = {
            "shape": list(blob["shape"]), "dtype": blob["dtype"], "quant_type": blob["quant_type"],
            "blocksize": blob["blocksize"], "nested": "nested_offset" in blob,
            "nested_blocksize": blob.get("nested_blocksize"), "nested_dtype": blob.get("nested_dtype"),
            "nested_offset": blob.get("nested_offset"), "bias": prefix + ".bias" in state_dict,
        }
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise LorakitError(
            f"{where}: tensor {blob_key!r} is not a readable bitsandbytes quant state ({err})"
        ) from None
    if record["nested"] and not isinstance(record["nested_offset"], (int, float)):
        raise LorakitError(f"{where}: tensor {blob_key!r} has a non-numeric nested_offset")
    return prefix, _check_record(record, prefix, where)


def load_bnb_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    compute_dtype: torch.dtype | str = torch.bfloat16,
    where: str = "load_bnb_state_dict",
) -> nn.Module:
    """Load a bitsandbytes/transformers 4-bit state dict: its 4-bit layers become Linear4bit in place."""
    compute_dtype = parse_compute_dtype(compute_dtype, f"{where}: compute_dtype")
    blob_keys = [k for k in state_dict if _BNB_BLOB in k and k.rsplit("__", 1)[-1] in QUANT_TYPES]
    if not blob_keys:
        raise LorakitError(
            f"{where}: no '*{_BNB_BLOB}nf4|fp4' key; this is not a bitsandbytes 4-bit state dict"
        )
    tensors = dict(state_dict)
    layers = {}
    for blob_key in blob_keys:
        prefix, record = _bnb_record(state_dict, blob_key, where)
        _target_linear(model, prefix, record, where)
        if record["nested"]:
            # bitsandbytes keeps the offset in the JSON blob; give the builder a tensor for it.
            tensors[f"{prefix}.weight.nested_offset"] = torch.tensor(float(record["nested_offset"]))
        layers[prefix] = _build_layer(tensors, _bnb_key_for(prefix), record, compute_dtype, where)
    plan = _plan_plain(model, tensors, set(layers), where)
    _swap_layers(model, layers)
    _apply_plain(model, plan)
    return model
