"""Build a model from safetensors one tensor at a time: cast, or 4-bit quantized, as each one arrives.

The parameters are created on the meta device (buffers such as RoPE's inverse frequencies are computed
as usual), then every tensor is read with plain file reads into its own buffer and either cast to the
target dtype or quantized straight into a Linear4bit. The load never holds more than the finished model
plus one source tensor: no full-precision copy of the model (QLoRA), and no memory-mapped file whose
touched pages would count in the process's resident memory until it is closed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.kernels import allocator

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK_BYTES = 8 * 2**20  # stored bytes converted per read


class SafetensorsFile:
    """The header of one .safetensors file and its tensors, read on demand with plain reads (no mmap)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise LorakitError(f"{path}: not a readable safetensors file ({exc.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise LorakitError(f"{path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries: dict[str, dict] = header
        self._scratch: torch.Tensor | None = None

    def nbytes(self, key: str) -> int:
        """Bytes of one stored tensor."""
        start, end = self.entries[key]["data_offsets"]
        return end - start

    def _entry(self, key: str) -> tuple[torch.dtype, list[int], int]:
        entry = self.entries[key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise LorakitError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which lorakit does not read")
        numel = 1
        for size in entry["shape"]:
            numel *= size
        if numel * dtype.itemsize != self.nbytes(key):
            raise LorakitError(f"{self.path}: tensor {key!r} holds {self.nbytes(key)} bytes, its shape needs "
                               f"{numel * dtype.itemsize}; the file is damaged")
        return dtype, entry["shape"], self.data_start + entry["data_offsets"][0]

    def read(self, handle, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key` from the open file `handle`, in `dtype` (default: as stored; floats only convert).

        A conversion goes through a reused buffer of at most CHUNK_BYTES, so the stored-dtype copy of a large
        tensor never exists beside the converted one (nor leaves holes in the heap between them).
        """
        stored, shape, offset = self._entry(key)
        if dtype is None or not stored.is_floating_point or dtype == stored:
            tensor = torch.empty(shape, dtype=stored)
            _read_exact(handle, offset, tensor.reshape(-1), self.path, key)
            return tensor
        tensor = torch.empty(shape, dtype=dtype)
        flat = tensor.reshape(-1)
        step = max(1, CHUNK_BYTES // stored.itemsize)
        if self._scratch is None or self._scratch.dtype != stored:
            self._scratch = torch.empty(min(step, flat.numel()), dtype=stored)
        for start in range(0, flat.numel(), step):
            count = min(step, flat.numel() - start)
            if self._scratch.numel() < count:
                self._scratch = torch.empty(count, dtype=stored)
            chunk = self._scratch[:count]
            _read_exact(handle, offset + start * stored.itemsize, chunk, self.path, key)
            flat[start:start + count].copy_(chunk)
        return tensor


def _read_exact(handle, offset: int, flat: torch.Tensor, path: Path, key: str) -> None:
    handle.seek(offset)
    view = memoryview(flat.view(torch.uint8).numpy())
    if handle.readinto(view) != len(view):
        raise LorakitError(f"{path}: truncated at tensor {key!r}; the file is damaged")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder (one file, or the shards its index names); [] if there are none."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    return []


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create every nn.Parameter on the meta device (buffers stay real) while the block runs."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def can_stream(model: nn.Module, files: list[SafetensorsFile]) -> bool:
    """Whether the files hold exactly the model's parameters by name (tied copies aside), so streaming applies."""
    stored = set()
    for file in files:
        stored |= set(file.entries)
    wanted = {name for name, _ in model.named_parameters()}
    buffers = {name for name, _ in model.named_buffers()}
    return wanted <= stored and stored <= wanted | buffers | _tied_names(model)


def _tied_names(model: nn.Module) -> set[str]:
    """Names under which a parameter shared with another one (tied weights) may also be stored."""
    every = dict(model.named_parameters(remove_duplicate=False))
    first = {name for name, _ in model.named_parameters()}
    return set(every) - first


def stream_weights(model: nn.Module, files: list[SafetensorsFile], dtype: torch.dtype,
                   quantize: dict[str, Callable[[torch.Tensor, torch.Tensor | None], nn.Module]] | None = None
                   ) -> nn.Module:
    """Fill a meta-parameter model from `files` (see can_stream): floats cast to `dtype`, `quantize`'s linears rebuilt.

    `quantize` maps a linear's module name to a builder `(weight, bias) -> module` that receives the stored
    weight in its stored dtype and the bias in `dtype`, and returns the module that replaces the linear.
    """
    builders = dict(quantize or {})
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in builders}
    params = {name for name, _ in model.named_parameters()}
    buffers = {name for name, _ in model.named_buffers()}
    with torch.no_grad():
        for header in files:
            with header.path.open("rb") as handle:
                for key in header.entries:
                    if key not in params and key not in buffers:
                        continue  # a tied duplicate
                    owner, _, leaf = key.rpartition(".")
                    quantized = owner in builders and leaf == "weight"  # quantized from the stored values
                    value = header.read(handle, key, None if quantized else dtype)
                    if owner in builders:
                        parts[owner][leaf] = value
                        linear = model.get_submodule(owner)
                        if "weight" in parts[owner] and (linear.bias is None or "bias" in parts[owner]):
                            _replace(model, owner, builders.pop(owner), parts.pop(owner), dtype)
                            # glibc keeps the holes the stored weight and the quantizer's temporaries leave between
                            # packed layers, and they add up over a model (docs/memory.md): give them back per layer.
                            allocator.release_freed_memory()
                        continue
                    module = model.get_submodule(owner)
                    if key in params:
                        trainable = module._parameters[leaf].requires_grad
                        module._parameters[leaf] = nn.Parameter(value, requires_grad=trainable)
                    else:
                        module._buffers[leaf] = value
    if builders:
        raise LorakitError(f"{files[0].path.parent}: no stored weight for {sorted(builders)[:3]}; the files are "
                           "incomplete")
    return model


def _replace(model: nn.Module, name: str, build, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    bias = parts.get("bias")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, build(parts["weight"], None if bias is None else bias.to(dtype)))
