"""The engine's adapters: PEFT folders read once, checked against the base, cached in memory, made resident.

Three tiers, as vLLM and S-LoRA keep them: any number of adapter folders on disk (registered by name);
up to `max_cpu_loras` read into memory (least recently used evicted first); up to `max_loras` resident in
the compute tables every adapted layer reads (`serve/layers.py`). An adapter that a running request uses is
pinned: neither tier evicts it. Each layer's table holds A [R, in] and scale * B [out, R] per slot, padded
with zeros to R = max_lora_rank, so different ranks, alphas and target sets share one table.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapter_types import adapter_kind
from lorakit.errors import LorakitError, UnknownAdapter
from lorakit.lora import lora_scale
from lorakit.peft_format import read_adapter_config, read_adapter_tensors
from lorakit.peft_keys import LINEAR_FACTORS, parse_peft_key


@dataclass
class LoadedAdapter:
    """One adapter in memory: per adapted module path, (A [r, in], scale * B [out, r]) in the engine's dtype."""

    name: str
    path: Path
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """Bytes held by its factors."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.factors.values())


def read_adapter(name: str, path: str | os.PathLike, shapes: dict[str, tuple[int, int]],
                 max_rank: int, dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """Read a PEFT adapter folder for a base whose adaptable layers have `shapes` {path: (in, out)}.

    The scale is applied in fp32 and the factors then rounded to `dtype` once: exactly what the engine's
    tables would hold, so keeping them in the tables' dtype changes no output and halves a bf16 cache.
    """
    folder = Path(path)
    config = read_adapter_config(folder)
    if adapter_kind(config) != "LORA":
        raise LorakitError(f"adapter {name!r} ({folder}): a {adapter_kind(config)} adapter is not served batched; "
                           "merge it into the base instead (lorakit merge)")
    if config.use_dora:
        raise LorakitError(f"adapter {name!r} ({folder}): a DoRA adapter rescales the base's rows, which a shared "
                           "base cannot serve batched; merge it into the base instead (lorakit merge)")
    if config.modules_to_save or config.bias != "none":
        raise LorakitError(f"adapter {name!r} ({folder}): modules_to_save and trained biases change the base "
                           "itself, which a shared base cannot serve; merge it instead (lorakit merge)")
    tensors = read_adapter_tensors(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None or parsed[1] not in LINEAR_FACTORS:
            raise LorakitError(f"adapter {name!r} ({folder}): key {key!r} is not a LoRA factor of a linear layer; "
                               "the engine serves LoRA on the decoder's linear layers")
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    factors, rank = {}, 0
    for module, pair in sorted(pairs.items()):
        A, B = _check_pair(name, folder, module, pair, shapes, max_rank)
        r = A.shape[0]
        scale = lora_scale(config.alpha_for(module), r, config.use_rslora)
        factors[module] = (A.float().to(dtype), (B.float() * scale).to(dtype))
        rank = max(rank, r)
    if not factors:
        raise LorakitError(f"adapter {name!r} ({folder}): holds no LoRA factors")
    return LoadedAdapter(name, folder, rank, factors)


def _check_pair(name: str, folder: Path, module: str, pair: dict[str, torch.Tensor],
                shapes: dict[str, tuple[int, int]], max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"adapter {name!r} ({folder})"
    if module not in shapes:
        raise LorakitError(f"{where}: targets {module!r}, which this base has no adaptable linear layer for: "
                           "it was made for another model")
    if len(pair) != 2:
        raise LorakitError(f"{where}: {module!r} lacks one of lora_A / lora_B")
    A, B = pair[LINEAR_FACTORS[0]], pair[LINEAR_FACTORS[1]]
    fan_in, fan_out = shapes[module]
    r = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != fan_in or tuple(B.shape) != (fan_out, r):
        raise LorakitError(f"{where}: {module!r} has A {tuple(A.shape)} and B {tuple(B.shape)}, the base needs "
                           f"[r, {fan_in}] and [{fan_out}, r]: it was made for another model")
    if r > max_rank:
        raise LorakitError(f"{where}: rank {r} at {module!r} exceeds max_lora_rank={max_rank}; raise max_lora_rank")
    return A, B


@dataclass
class AdapterCache:
    """Registered folders, the in-memory LRU and the resident slots, with pins for adapters in use."""

    shapes: dict[str, tuple[int, int]]
    max_loras: int
    max_cpu_loras: int
    max_rank: int
    dtype: torch.dtype = torch.float32  # the factors' dtype in memory: the tables' dtype
    paths: dict[str, Path] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # registered name -> its largest rank (kept when evicted)
    retiring: set = field(default_factory=set)  # removed while requests still use it: refused to new requests
    reads: int = 0  # adapter folders read from disk
    evictions: dict = field(default_factory=lambda: {"memory": 0, "table": 0})  # adapters evicted from each tier
    loaded: OrderedDict = field(default_factory=OrderedDict)  # name -> LoadedAdapter, least recent first
    slots: dict[str, int] = field(default_factory=dict)  # resident name -> table slot
    slot_used: OrderedDict = field(default_factory=OrderedDict)  # resident name -> None, least recent first
    pins: dict[str, int] = field(default_factory=dict)  # name -> running requests using it

    def register(self, name: str, path: str | os.PathLike) -> LoadedAdapter:
        """Check and read an adapter folder under `name` (it is then in memory); a bad one changes nothing."""
        return self.add(self.read(name, path))

    def read(self, name: str, path: str | os.PathLike) -> LoadedAdapter:
        """Check and read an adapter folder for this base, changing nothing (safe on another thread)."""
        self.check_new_name(name)
        return read_adapter(name, path, self.shapes, self.max_rank, self.dtype)

    def check_new_name(self, name: str) -> None:
        """Raise unless `name` is a non-empty string not registered yet."""
        if not isinstance(name, str) or not name:
            raise LorakitError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.paths:
            raise LorakitError(f"adapter {name!r} is already added; remove_adapter({name!r}) first")

    def add(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Register an adapter `read` returned (it is then in memory)."""
        self.check_new_name(adapter.name)
        self.reads += 1
        self.paths[adapter.name] = adapter.path
        self.ranks[adapter.name] = adapter.rank
        self._remember(adapter)
        return adapter

    def unregister(self, name: str) -> None:
        """Forget an adapter (it must not be in use)."""
        self.require(name, retiring_ok=True)
        if self.pins.get(name):
            raise LorakitError(f"adapter {name!r} is in use by {self.pins[name]} running request(s); "
                               "remove it when they finish")
        del self.paths[name]
        del self.ranks[name]
        self.retiring.discard(name)
        self.loaded.pop(name, None)
        self.slots.pop(name, None)
        self.slot_used.pop(name, None)

    def require(self, name: str, retiring_ok: bool = False) -> None:
        """Raise a clear error for an unknown adapter name (or one being removed, unless `retiring_ok`)."""
        if name not in self.paths or (name in self.retiring and not retiring_ok):
            known = ", ".join(self.servable()) or "none"
            raise UnknownAdapter(f"unknown adapter {name!r}; known adapters: {known} (add one with add_adapter)", name)

    def servable(self) -> list[str]:
        """The registered adapters new requests may name (not those being removed), sorted."""
        return sorted(set(self.paths) - self.retiring)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter in memory, read again from its folder if it was evicted."""
        self.require(name, retiring_ok=True)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        adapter = read_adapter(name, self.paths[name], self.shapes, self.max_rank, self.dtype)
        self.reads += 1
        self._remember(adapter)
        return adapter

    def _remember(self, adapter: LoadedAdapter) -> None:
        self.loaded[adapter.name] = adapter
        self.loaded.move_to_end(adapter.name)
        self._trim(keep=adapter.name)

    def _trim(self, keep: str | None = None) -> None:
        """Evict least recently used unpinned adapters from memory down to max_cpu_loras."""
        while len(self.loaded) > self.max_cpu_loras:
            victim = next((n for n in self.loaded if not self.pins.get(n) and n != keep), None)
            if victim is None:
                break  # every adapter in memory is in use: hold more until a request finishes
            del self.loaded[victim]
            self.evictions["memory"] += 1

    def pin(self, name: str) -> None:
        """Mark an adapter as used by one more running request."""
        self.pins[name] = self.pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        """One request using the adapter finished (memory above max_cpu_loras is given back once unused)."""
        self.pins[name] -= 1
        self._trim()

    def free_slot(self) -> int | None:
        """A table slot for a new resident adapter: an empty one, else the least recently used unpinned one."""
        taken = set(self.slots.values())
        empty = next((s for s in range(self.max_loras) if s not in taken), None)
        if empty is not None:
            return empty
        victim = next((n for n in self.slot_used if not self.pins.get(n)), None)
        if victim is None:
            return None
        del self.slot_used[victim]
        self.evictions["table"] += 1
        return self.slots.pop(victim)

    def touch(self, name: str) -> None:
        """Mark a resident adapter as just used."""
        self.slot_used[name] = None
        self.slot_used.move_to_end(name)
