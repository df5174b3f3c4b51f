"""Batched multi-adapter generation with continuous batching: the engine the server and `lorakit generate` use.

A step admits waiting requests into free cache slots (each slot holds one sequence's KV cache up to
`max_model_len` tokens: a request waits while every slot is taken or its adapters cannot be made resident,
it never fails the engine), prefills their prompts in chunks, then runs one decoding step for every running
sequence at once. In each adapted layer the base product runs once for the batch and every row's low-rank
update comes from the adapter table (`serve/layers.py`, `kernels/multi_lora.py`); a blend is a weighted sum
of updates in the same pass. Finished sequences leave at once and the rest are compacted into slots
0..B-1, so a decoding step reads plain views of the cache. Like `lk.enable_fast_training`, the engine keeps
freed CPU memory in the process (`kernels/allocator.py`): every step allocates the same activation-sized
blocks, which glibc would otherwise hand back and fault in again; `close()` puts glibc's defaults back.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.kernels import allocator
from lorakit.kernels.multi_lora import Entries
from lorakit.serve import runner
from lorakit.serve.adapters import AdapterCache, LoadedAdapter
from lorakit.serve.layers import BatchAdapters, MultiLoraLinear

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Result:
    """One finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or a stop string), "length" (max_new_tokens) or "abort" (cancelled)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    """A submitted request and its progress; `new_tokens` collects tokens not yet taken by a stream reader."""

    id: int
    prompt_ids: list[int]
    mix: dict[str, float]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""  # the completion, set when the request finishes

    @property
    def done(self) -> bool:
        """True once the request has finished."""
        return self.finish_reason is not None


def encode(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt: a string as is, a list of chat messages through the chat template."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    raise LorakitError(f"a prompt is a string or a list of chat messages, got {type(prompt).__name__}")


def parse_mix(adapter: str | dict[str, float] | None) -> dict[str, float]:
    """{name: weight} of one request: None = the base model, a name = that adapter, a dict = a blend."""
    if adapter is None:
        return {}
    if isinstance(adapter, str):
        return {adapter: 1.0}
    if not isinstance(adapter, dict) or not adapter:
        raise LorakitError(f"adapter must be a name, None or a non-empty {{name: weight}} blend, got {adapter!r}")
    for name, weight in adapter.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise LorakitError(f"blend weight of {name!r} must be a finite number, got {weight!r}")
    return {name: float(weight) for name, weight in adapter.items()}


def wrap_layers(model: nn.Module, batch: BatchAdapters, slots: int, max_rank: int,
                dtype: torch.dtype) -> tuple[dict[str, MultiLoraLinear], dict[str, tuple[int, int]]]:
    """Put a MultiLoraLinear around every projection of every decoder layer; returns them and their shapes."""
    layers, shapes = {}, {}
    for index, block in enumerate(model.model.layers):
        for parent_name, parent in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            for name in ADAPTED:
                base = getattr(parent, name, None)
                if base is None:
                    continue
                path = f"model.layers.{index}.{parent_name}.{name}"
                layer = MultiLoraLinear(base, batch, slots, max_rank, dtype)
                setattr(parent, name, layer)
                layers[path], shapes[path] = layer, (base.in_features, base.out_features)
    return layers, shapes


class Engine:
    """Many adapters over one base model, batched per step; see the module docstring.

    The engine takes over `model`: its decoder projections are wrapped in place (MultiLoraLinear), so a
    model given to an engine serves through that engine only.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_loras: int = 16, max_cpu_loras: int = 64,
                 max_lora_rank: int = 64, max_batch: int = 64, max_model_len: int = 512,
                 prefill_chunk: int = 256) -> None:
        runner.check_model(model)
        for name, value in (("max_loras", max_loras), ("max_cpu_loras", max_cpu_loras),
                            ("max_lora_rank", max_lora_rank), ("max_batch", max_batch),
                            ("max_model_len", max_model_len), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LorakitError(f"Engine: {name} must be a positive integer, got {value!r}")
        if max_cpu_loras < max_loras:
            raise LorakitError(f"Engine: max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras})")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.dtype = model.get_input_embeddings().weight.dtype
        self.device = model.get_input_embeddings().weight.device
        self.batch = BatchAdapters()
        self.layers, shapes = wrap_layers(model, self.batch, max_loras, max_lora_rank, self.dtype)
        self.cache = AdapterCache(shapes, max_loras, max_cpu_loras, max_lora_rank, self.dtype)
        self.kv = runner.SlotCache(model, max_batch, max_model_len, self.dtype, self.device)
        self.max_batch, self.max_model_len, self.prefill_chunk = max_batch, max_model_len, prefill_chunk
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # running[i] owns cache slot i
        self.lengths: list[int] = []  # tokens in the cache of each running request
        self.eos_ids = self._eos_ids()
        self._ids = itertools.count()
        self._set_allocator = not allocator.retaining() and allocator.retain_freed_memory()

    def close(self) -> None:
        """Undo the engine's process-wide allocator setting (when it made it); the engine stays usable."""
        if self._set_allocator:
            allocator.restore_default_allocator()
            self._set_allocator = False

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    # ---------------------------------------------------------------------------------- adapters

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Register a PEFT adapter folder under `name`; refused (engine unchanged) if it does not fit the base."""
        self.cache.register(name, path)

    def read_adapter(self, name: str, path: str | os.PathLike) -> LoadedAdapter:
        """add_adapter's disk read and checks, changing nothing: a server runs it off the engine's thread."""
        return self.cache.read(name, path)

    def add_read_adapter(self, adapter: LoadedAdapter) -> None:
        """Register what read_adapter returned."""
        self.cache.add(adapter)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter: new requests naming it are refused from now on; queued and running ones finish."""
        self.cache.require(name)
        self.cache.retiring.add(name)
        self._drop_retired()

    def _drop_retired(self) -> None:
        """Unregister removed adapters that no queued or running request uses any more."""
        if not self.cache.retiring:
            return
        used = {name for r in (*self.waiting, *self.running) if not r.done for name in r.mix}
        for name in [n for n in self.cache.retiring if n not in used]:
            slot = self.cache.slots.get(name)
            self.cache.unregister(name)
            if slot is not None:
                for layer in self.layers.values():
                    layer.load_slot(slot, None)

    def adapters(self) -> list[dict[str, Any]]:
        """Every registered adapter: name, folder, rank, and whether it is in memory, resident and in use."""
        cache = self.cache
        return [{"name": name, "path": str(path), "in_memory": name in cache.loaded,
                 "resident": name in cache.slots, "in_use": cache.pins.get(name, 0),
                 "rank": cache.ranks[name]}
                for name, path in sorted(cache.paths.items())]

    def _make_resident(self, names: list[str]) -> bool:
        """Load the adapters into table slots; False (nothing pinned) when no slot can be freed now."""
        for name in names:
            if name in self.cache.slots:
                continue
            adapter = self.cache.get(name)
            slot = self.cache.free_slot()
            if slot is None:
                return False
            for path, layer in self.layers.items():
                layer.load_slot(slot, adapter.factors.get(path))
            self.cache.slots[name] = slot
            self.cache.touch(name)
        return True

    # ---------------------------------------------------------------------------------- requests

    def encode(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt (see `encode`)."""
        return encode(self.tokenizer, prompt)

    def submit(self, prompt: str | list[dict[str, str]], adapter: str | dict[str, float] | None = None,
               max_new_tokens: int | None = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None) -> Request:
        """Queue one request; it runs from the next step on. Bad input raises here, before anything is queued.

        max_new_tokens=None generates up to the end of the context (max_model_len).
        """
        mix = parse_mix(adapter)
        for name in mix:
            self.cache.require(name)
        ids = self.encode(prompt)
        if max_new_tokens is None:
            max_new_tokens = max(self.max_model_len - len(ids), 1)  # a prompt filling the context is refused below
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise LorakitError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not ids:
            raise LorakitError("the prompt is empty")
        if len(ids) + max_new_tokens > self.max_model_len:
            raise LorakitError(f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                               f"the engine's context of {self.max_model_len} tokens (max_model_len)")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (temperature, top_p))
        if not numbers or temperature < 0 or not 0 < top_p <= 1:
            raise LorakitError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise LorakitError(f"seed must be an integer, got {seed!r}")
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise LorakitError(f"stop must be a list of strings, got {stop!r}")
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        request = Request(next(self._ids), ids, mix, max_new_tokens, float(temperature), float(top_p),
                          list(stop or []), generator)
        self.waiting.append(request)
        return request

    def generate(self, prompts: list, adapters: list | None = None, **params: Any) -> list[Result]:
        """Run every prompt (adapters[i]: a name, None or a blend) to completion; results in order."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise LorakitError(f"{len(prompts)} prompts but {len(adapters)} adapters; give one per prompt")
        requests = [self.submit(prompt, adapter, **params) for prompt, adapter in zip(prompts, adapters)]
        while not all(r.done for r in requests):
            self.step()
        return [self.result(r) for r in requests]

    def result(self, request: Request) -> Result:
        """The Result of a finished request."""
        return Result(request.text, list(request.output_ids), request.finish_reason, len(request.prompt_ids),
                      len(request.output_ids))

    # ---------------------------------------------------------------------------------- stepping

    def step(self) -> list[Request]:
        """Admit and prefill what fits, then decode one token for every running sequence; returns those that moved."""
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        decoding = [r for r in self.running if r not in admitted and not r.done]
        if decoding:
            self._decode(len(decoding))
        moved = admitted + decoding
        self._release_finished()
        self._drop_retired()
        return moved

    def cancel(self, request: Request) -> None:
        """Stop a request now (its client went away): finish_reason "abort", its slot and adapters freed at once."""
        if request.done:
            return
        request.finish_reason = "abort"
        request.text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self._release_finished()
        self._drop_retired()

    def _admit(self) -> list[Request]:
        """Move waiting requests into free slots, in order; at most one adapter is read from disk per step."""
        admitted, reads = [], 0
        for request in list(self.waiting):
            if len(self.running) >= self.max_batch:
                break
            names = list(request.mix)
            misses = sum(name not in self.cache.loaded for name in names)
            if misses and reads + misses > 1 and (reads or admitted):
                continue  # a disk read waits for the next step, so running requests stall one read at most
            reads += misses
            for name in names:
                self.cache.pin(name)  # pinned first: making one resident must not evict another of its own
            if not self._make_resident(names):
                for name in names:
                    self.cache.unpin(name)
                continue
            self.waiting.remove(request)
            self.running.append(request)
            self.lengths.append(0)
            admitted.append(request)
        return admitted

    def _set_rows(self, requests: list[Request]) -> None:
        mixes = [{self.cache.slots[name]: weight for name, weight in r.mix.items()} for r in requests]
        for r in requests:
            for name in r.mix:
                self.cache.touch(name)
        ranks = {self.cache.slots[n]: self.cache.ranks[n] for r in requests for n in r.mix}
        self.batch.entries = Entries.build(mixes, self.device, ranks) if any(mixes) else None

    def _prefill(self, requests: list[Request]) -> None:
        first = len(self.running) - len(requests)
        self._set_rows(requests)
        longest = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, longest, self.prefill_chunk):
            chunk = [r.prompt_ids[start:start + self.prefill_chunk] for r in requests]
            width = max(len(c) for c in chunk) or 1
            ids = torch.tensor([c + [pad] * (width - len(c)) for c in chunk], device=self.device)
            last = torch.tensor([max(len(c) - 1, 0) for c in chunk], device=self.device)
            starts = torch.full((len(requests),), start, device=self.device)
            logits = runner.forward(self.model, self.kv, ids, slice(first, first + len(requests)), starts, last)
            for row, r in enumerate(requests):
                if start < len(r.prompt_ids) <= start + self.prefill_chunk:  # this chunk holds its last token
                    self.lengths[first + row] = len(r.prompt_ids)
                    self._emit(r, logits[row])

    def _decode(self, count: int) -> None:
        requests = self.running[:count]
        self._set_rows(requests)
        ids = torch.tensor([[r.output_ids[-1]] for r in requests], device=self.device)
        starts = torch.tensor(self.lengths[:count], device=self.device)
        logits = runner.forward(self.model, self.kv, ids, slice(0, count), starts)
        for row, r in enumerate(requests):
            self.lengths[row] += 1
            self._emit(r, logits[row])

    def _emit(self, request: Request, logits: torch.Tensor) -> None:
        token = sample(logits, request.temperature, request.top_p, request.generator)
        if token in self.eos_ids:  # the end of sequence is not part of the completion
            request.finish_reason = "stop"
        else:
            request.output_ids.append(token)
            request.new_tokens.append(token)
        if request.stop:  # stop strings need the text every step; otherwise it is decoded once, at the end
            text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
            hits = [text.index(stop) for stop in request.stop if stop and stop in text]
            if hits:
                request.text, request.finish_reason = text[: min(hits)], "stop"
                return
        if request.finish_reason is None and len(request.output_ids) >= request.max_new_tokens:
            request.finish_reason = "length"
        if request.done:
            request.text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)

    def _release_finished(self) -> None:
        """Drop finished sequences, unpin their adapters and compact the survivors into slots 0..B-1."""
        keep = [i for i, r in enumerate(self.running) if not r.done]
        for r in self.running:
            if r.done:
                for name in r.mix:
                    self.cache.unpin(name)
        for target, source in enumerate(keep):
            if target != source:
                self.kv.move(source, target, self.lengths[source])
        self.running = [self.running[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else a draw from the temperature-scaled distribution cut to its top_p mass."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
