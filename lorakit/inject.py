"""Model surgery as free functions: find targets, wrap, freeze, switch adapters, merge, unload."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.adapter_types import handler_for
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.lora import (
    LoraLayer,
    ModulesToSave,
    base_weight,
    is_linear_like,
    is_quantized,
    requantize_like,
    wrap_layer,
)
from lorakit.peft_keys import saved_bias_names

ADAPTER_PREFIXES = ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B.", "lora_magnitude_vector.",
                    "modules_to_save.", "vera_lambda_b.", "vera_lambda_d.", "lora_E.")
_CONFIGS_ATTR = "lorakit_configs"
_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters added to `model`, by name (lorakit keeps them on the model itself)."""
    return model.__dict__.setdefault(_CONFIGS_ATTR, {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every adapter layer of the model with its full module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Modules LoRA can target: existing adapter layers, and supported layers not inside a wrapper."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name + ".")
            if isinstance(module, LoraLayer):
                found[name] = module
        elif name and (is_linear_like(module) or isinstance(module, (nn.Embedding, nn.Conv2d))):
            found[name] = module
    return found


def _output_head_names(model: nn.Module) -> set[str]:
    # Duck-typed so the core needs no transformers import: PreTrainedModel has get_output_embeddings().
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head or
            (isinstance(module, LoraLayer) and module.base_layer is head)}


def _is_linear_target(module: nn.Module) -> bool:
    return is_linear_like(module.base_layer if isinstance(module, LoraLayer) else module)


def _matches(name: str, config: LoraConfig, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    if config.layers_to_transform is None:
        return True
    return _layer_index(name, config.layers_pattern) in config.layers_to_transform


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if layers_pattern is None:
        match = _LAYER_INDEX.match(name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf".*\.{p}\.(\d+)\.", name))), None)
    return int(match.group(1)) if match else None


def _excluded(name: str, exclude: list[str] | str | None) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == e or name.endswith("." + e) for e in exclude)


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules `config.target_modules` selects on `model` (error if none)."""
    candidates = _candidates(model)
    targets = config.target_modules
    if targets is None:
        targets = _default_targets(candidates)
    if isinstance(targets, str) and targets in ("all-linear", "all-attention", "all-mlp"):
        heads = _output_head_names(model)
        words = {"all-attention": _ATTENTION_WORDS, "all-mlp": _MLP_WORDS}.get(targets)
        chosen = [n for n, m in candidates.items() if _is_linear_target(m) and n not in heads
                  and (words is None or any(w in n.lower() for w in words))]
    else:
        chosen = [n for n in candidates if _matches(n, config, targets)]
    chosen = [n for n in chosen if not _excluded(n, config.exclude_modules)]
    if not chosen:
        raise LorakitError(
            f"target_modules={config.target_modules!r} matches no module; this model's linear layers are: "
            f"{short_names(n for n, m in candidates.items() if _is_linear_target(m))}"
        )
    return chosen


def _default_targets(candidates: dict[str, nn.Module]) -> list[str]:
    # PEFT picks per-architecture defaults; the query/value projections are the common case.
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"]):
        if any(n.endswith("." + p) for n in candidates for p in pair):
            return pair
    raise LorakitError("target_modules is not set and no q_proj/v_proj found; name the modules to adapt")


def short_names(names: Iterator[str] | list[str], limit: int = 20) -> str:
    """Module names with layer numbers folded: 'model.layers.N.self_attn.q_proj (x30)'."""
    counts: dict[str, int] = {}
    for name in names:
        key = re.sub(r"\.\d+\.", ".N.", name)
        counts[key] = counts.get(key, 0) + 1
    parts = [k if c == 1 else f"{k} (x{c})" for k, c in counts.items()]
    more = f", ... {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more if parts else "(none)"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to the targeted layers, freeze the base, make the adapter trainable."""
    handler = handler_for(config, adapter_configs(model))  # VeRA/AdaLoRA configs go to their own module
    if handler is not None:
        return handler.add_adapter(model, config, name)
    check_new_name(model, name)
    targets = resolve_targets(model, config)
    for target in targets:
        module = model.get_submodule(target)
        layer = module if isinstance(module, LoraLayer) else wrap_layer(module)
        layer.add(name, config.rank_for(target), config.alpha_for(target), config.lora_dropout,
                  config.use_rslora, config.init_lora_weights, config.use_dora, config.loftq_config)
        if layer is not module:
            _set_submodule(model, target, layer)
    return finish_adding(model, config, name, config.bias)


def check_new_name(model: nn.Module, name: str) -> None:
    """Refuse an adapter name that is malformed or already on the model."""
    if not isinstance(name, str) or not name or "." in name:
        raise LorakitError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapter_configs(model):
        raise LorakitError(f"adapter {name!r} already exists on this model; delete_adapter() it first")


def finish_adding(model: nn.Module, config, name: str, bias: str) -> nn.Module:
    """What adding every adapter kind ends with: modules_to_save copies, the config kept, the base frozen."""
    for target in _modules_to_save_targets(model, config):
        module = model.get_submodule(target)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add(name)
        if wrapper is not module:
            _set_submodule(model, target, wrapper)
    adapter_configs(model)[name] = config
    _freeze_base(model, bias)
    if not any(layer.active_adapters for _, layer in lora_layers(model)):
        set_adapter(model, name)  # the first adapter added is the active one, as in PEFT
    return model


def _modules_to_save_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, m in model.named_modules() if n and not isinstance(m, LoraLayer)
             and any(n == s or n.endswith("." + s) for s in config.modules_to_save)
             and ".modules_to_save." not in n and not n.endswith(".original_module")]
    if not names:
        raise LorakitError(f"modules_to_save={config.modules_to_save!r} matches no module of this model")
    return names


def is_adapter_param(param_name: str) -> bool:
    """True for lorakit/PEFT adapter tensors (lora_A/B, lora_embedding_A/B, DoRA magnitudes, modules_to_save)."""
    return any(("." + p) in ("." + param_name) for p in ADAPTER_PREFIXES)


def _freeze_base(model: nn.Module, bias: str) -> None:
    params = dict(model.named_parameters())
    saved = saved_bias_names(params, {n for n, _ in lora_layers(model)}, bias)
    for param_name, param in params.items():
        if is_adapter_param(param_name):
            continue
        # bias="all" trains every bias, also the unused original beside a modules_to_save copy, which is never
        # saved (PEFT freezes it); kept, as trainable counts and resumed optimizer states depend on it.
        param.requires_grad_(param_name in saved or (bias == "all" and param_name.endswith(".bias")))


def trainable_base_parameters(model: nn.Module) -> list[str]:
    """Names of base (non-adapter) parameters that still require grad: should be empty after add_adapter."""
    biases = {c.bias for c in adapter_configs(model).values()}
    return [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_param(n)
            and not (n.endswith(".bias") and biases - {"none"})]


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` (one or several) the active adapters of every layer."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            raise LorakitError(f"no adapter named {name!r}; this model has {sorted(known) or 'none'}")
    for _, module in _wrappers(model):
        module.active_adapters = [n for n in names if n in _held(module)]


def _held(module: nn.Module) -> list[str]:
    return list(module.modules_to_save) if isinstance(module, ModulesToSave) else module.adapter_names


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters active on the model (union over its layers, in order)."""
    seen: list[str] = []
    for _, module in _wrappers(model):
        seen += [n for n in module.active_adapters if n not in seen]
    return seen


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters off (merged ones are unmerged) inside the block, restored after."""
    merged = {name: list(layer.merged_adapters) for name, layer in lora_layers(model)}
    wrappers = list(_wrappers(model))
    previous = [m.disabled for _, m in wrappers]
    for _, module in wrappers:
        if isinstance(module, LoraLayer):
            module.unmerge()
        module.disabled = True
    try:
        yield model
    finally:
        for (_, module), was in zip(wrappers, previous):
            module.disabled = was
        for name, layer in lora_layers(model):
            layer.merge(merged.get(name, []))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (wrappers left with no adapter are unwrapped)."""
    configs = adapter_configs(model)
    if name not in configs:
        raise LorakitError(f"no adapter named {name!r}; this model has {sorted(configs) or 'none'}")
    for module_name, module in list(_wrappers(model)):
        module.delete(name)
        if not _held(module):
            inner = module.base_layer if isinstance(module, LoraLayer) else module.original_module
            _set_submodule(model, module_name, inner)
    del configs[name]


def merge_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold the active (or named) adapters into the base weights: zero extra inference latency."""
    for _, layer in lora_layers(model):
        layer.merge(names)


def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters: subtract the merged deltas, restoring the base weights."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True, requantize: bool = False) -> nn.Module:
    """Remove all adapter wrappers; with merge=True the active adapters are folded in first.

    A 4-bit base is merged in float: its layers come back as plain nn.Linear in the compute dtype
    (requantize=True quantizes the merged weights again with the same settings).
    """
    for module_name, module in list(_wrappers(model)):
        if isinstance(module, ModulesToSave):
            inner = module.active_module() if merge else module.original_module
        elif merge:
            inner = _merged_base(module, requantize)
        else:
            module.unmerge()
            inner = module.base_layer
        _set_submodule(model, module_name, inner)
    model.__dict__.pop(_CONFIGS_ATTR, None)
    return model


def _merged_base(layer: LoraLayer, requantize: bool) -> nn.Module:
    base = layer.base_layer
    live = [n for n in layer.active_adapters if n not in layer.merged_adapters and not layer.disabled]
    if not is_quantized(base):
        layer.merge(live)
        return layer.base_layer
    weight = layer.merged_weight(live, base_weight(base, torch.float32))
    if requantize:
        return requantize_like(base, weight)
    plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                      device=weight.device, dtype=base.compute_dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if base.bias is not None:
            plain.bias.copy_(base.bias)
    return plain.requires_grad_(False)


def _logical_numel(module: nn.Module, own: list[nn.Parameter]) -> int:
    # A 4-bit layer stores two weights per byte; count the weights it represents, as PEFT does. Its codes
    # may be a Parameter (held so for FSDP); they are the weights counted here, not parameters of their own.
    if is_quantized(module):
        codes = getattr(module, "packed", None)
        return module.in_features * module.out_features + sum(p.numel() for p in own if p is not codes)
    return sum(p.numel() for p in own)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they encode."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total, seen = 0, set()
    for module in model.modules():
        # Tied weights (GPT-2's lm_head is wte) are one parameter; PEFT counts them once.
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        total += _logical_numel(module, own)
    return trainable, total


def format_trainable_parameters(model: nn.Module) -> str:
    """PEFT's report line: 'trainable params: N || all params: M || trainable%: x'."""
    trainable, total = trainable_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print format_trainable_parameters(model)."""
    print(format_trainable_parameters(model))
