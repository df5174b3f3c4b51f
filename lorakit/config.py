"""LoraConfig: PEFT's field names and defaults, validated on construction."""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lorakit.errors import LorakitError

# Shorthands that resolve to a set of full module names (saved resolved, as PEFT does for "all-linear").
TARGET_SHORTHANDS = ("all-linear", "all-attention", "all-mlp")
INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_K", "olora", "loftq")
# Inits that rewrite the base weight: a saved adapter records the final weights, so loading never reruns them.
BASE_CHANGING_INITS = ("pissa", "olora", "loftq")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter; names and defaults are PEFT's LoraConfig's."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    loftq_config: dict[str, int] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise LorakitError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise LorakitError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if not _valid_init(self.init_lora_weights):
            raise LorakitError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora' or 'loftq', "
                f"got {self.init_lora_weights!r}"
            )
        if not isinstance(self.use_dora, bool):
            raise LorakitError(f"use_dora must be true or false, got {self.use_dora!r}")
        _check_loftq(self.init_lora_weights, self.loftq_config)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_names("modules_to_save", self.modules_to_save)
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_SHORTHANDS:
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise LorakitError(
                    f"target_modules {self.target_modules!r} is not a valid regex ({exc}); "
                    f"give a list of module names, a regex, or one of {TARGET_SHORTHANDS}"
                ) from None

    def rank_for(self, module_name: str) -> int:
        """The rank of one module: the first matching rank_pattern key, else r."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha of one module: the first matching alpha_pattern key, else lora_alpha."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True, where: str = "LoraConfig") -> LoraConfig:
        """Build from a dict; unknown keys are an error (strict) or dropped with a warning (PEFT files)."""
        return config_from_mapping(cls, values, strict, where)


def config_from_mapping(cls: type, values: dict[str, Any], strict: bool, where: str) -> Any:
    """A config dataclass from a dict; an unknown key is an error naming the closest field (strict) or dropped."""
    known = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown and strict:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
        raise LorakitError(f"{where}: unknown option {key!r}{hint}")
    return cls(**{k: v for k, v in values.items() if k in known})


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LorakitError(f"{name} must be an integer >= 1, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LorakitError(f"{name} must be a number > 0, got {value!r}")


def _check_names(name: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise LorakitError(f"{name} must be a list of module names or a regex string, got {value!r}")


def _valid_init(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    return value in ("gaussian", "pissa", "olora", "loftq") or re.fullmatch(r"pissa_niter_\d+", value) is not None


def _check_loftq(init: Any, loftq_config: Any) -> None:
    if not isinstance(loftq_config, dict):
        raise LorakitError(f"loftq_config must be a mapping like {{'loftq_bits': 4, 'loftq_iter': 1}}, "
                           f"got {loftq_config!r}")
    if init != "loftq":
        if loftq_config:
            raise LorakitError("loftq_config is set but init_lora_weights is not 'loftq'; set both or neither")
        return
    unknown = sorted(set(loftq_config) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise LorakitError(f"loftq_config: unknown key {unknown[0]!r}; valid keys: loftq_bits, loftq_iter")
    bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    if bits != 4 or isinstance(bits, bool):
        raise LorakitError(f"loftq_config.loftq_bits must be 4 (NF4; PEFT dropped 2 and lorakit has no 8-bit base), "
                           f"got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise LorakitError(f"loftq_config.loftq_iter must be an integer >= 1, got {iters!r}")


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    # PEFT's get_pattern_key: the key must match a whole trailing part of the dotted name.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def peft_config_dict(config: LoraConfig, target_modules: list[str] | str | None) -> dict[str, Any]:
    """The adapter_config.json content PEFT expects (only keys every PEFT >= 0.13 understands)."""
    data = config.to_dict()
    data["target_modules"] = target_modules
    data.update(peft_type="LORA", inference_mode=True, revision=None, lora_bias=False)
    return data


def config_from_peft_dict(data: dict[str, Any], where: str) -> LoraConfig:
    """Read a PEFT adapter_config.json dict: LoRA only; options lorakit can't honour are errors."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise LorakitError(f"{where}: peft_type is {peft_type!r}; lorakit loads LoRA adapters only ('LORA')")
    unsupported = {
        "lora_bias": False, "layer_replication": None, "use_qalora": False, "trainable_token_indices": None,
        "target_parameters": None, "alora_invocation_tokens": None,
    }
    for key, default in unsupported.items():
        if data.get(key, default) not in (default, [], {}):
            raise LorakitError(f"{where}: {key}={data[key]!r} is not supported by lorakit (only {default!r})")
    init = data.get("init_lora_weights", True)
    if not _valid_init(init):
        # The adapter was initialised some other way (eva, corda, loftq...); the saved weights are what count.
        warnings.warn(f"{where}: init_lora_weights={init!r} treated as True for loading", stacklevel=3)
        data = {**data, "init_lora_weights": True}
    if data.get("loftq_config") and data.get("init_lora_weights") != "loftq":
        # PEFT's LoftQ recipe saves with init_lora_weights=true and leaves loftq_config filled; PEFT ignores it.
        data = {**data, "loftq_config": {}}
    if isinstance(data.get("target_modules"), list):
        data = {**data, "target_modules": sorted(data["target_modules"])}
    return LoraConfig.from_dict(data, strict=False)
