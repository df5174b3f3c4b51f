"""TrainConfig: one training run's settings; YAML maps onto it 1:1, `--set key=value` overrides."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.adalora import AdaLoraConfig
from lorakit.config import LoraConfig
from lorakit.constants import DEFAULT_MODEL, OPTIMIZERS, QUANT_TYPES
from lorakit.errors import LorakitError
from lorakit.kernels.attention import IMPLEMENTATIONS as ATTN_IMPLEMENTATIONS
from lorakit.train.distributed import DISTRIBUTED_KINDS
from lorakit.vera import VeraConfig

SCHEDULERS = ("cosine", "linear", "constant")
QUANTIZE_CHOICES = (*QUANT_TYPES, None)  # None: a float base
FLOAT_FIELDS = ("val_fraction", "num_epochs", "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm")
BOOL_FIELDS = ("packing", "train_on_prompt", "gradient_checkpointing", "bf16", "chunked_loss", "fast_kernels",
               "tensorboard", "fsdp_cpu_offload")
DEVICES = ("auto", "cpu", "cuda")
# `adapter:` picks the kind; its settings are the mapping of the same name (PEFT's config fields).
ADAPTER_CONFIGS = {"lora": LoraConfig, "vera": VeraConfig, "adalora": AdaLoraConfig}


def _default_lora() -> dict[str, Any]:
    return {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _default_vera() -> dict[str, Any]:
    return {"r": 256, "target_modules": "all-linear"}


def _default_adalora() -> dict[str, Any]:
    # total_step is the run's step count unless set; the schedule prunes 12 -> 8 between tinit and tfinal.
    return {"init_r": 12, "target_r": 8, "lora_alpha": 32, "target_modules": "all-linear"}


@dataclass
class TrainConfig:
    """A fine-tuning run: model, data, adapter, optimisation, logging and checkpoint settings."""

    model: str = DEFAULT_MODEL
    quantize: str | None = "nf4"
    train_file: str = ""
    val_file: str | None = None
    val_fraction: float = 0.0
    output_dir: str = "runs/train"
    adapter: str = "lora"
    lora: dict[str, Any] = field(default_factory=_default_lora)
    vera: dict[str, Any] = field(default_factory=_default_vera)
    adalora: dict[str, Any] = field(default_factory=_default_adalora)
    max_seq_len: int = 512
    packing: bool = False
    train_on_prompt: bool = False
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 0
    num_epochs: float = 1.0
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    bf16: bool = True
    chunked_loss: bool = True
    attn_implementation: str = "auto"
    fast_kernels: bool = True
    device: str = "auto"
    distributed: str = "none"
    distributed_timeout: int = 300
    fsdp_cpu_offload: bool = False  # distributed: fsdp keeps each rank's shards in CPU memory between uses
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.quantize in ("none", "None", ""):
            self.quantize = None
        _choice("quantize", self.quantize, QUANTIZE_CHOICES)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("device", self.device, DEVICES)
        _choice("distributed", self.distributed, DISTRIBUTED_KINDS)
        if not _is_int(self.distributed_timeout) or self.distributed_timeout < 1:
            raise LorakitError(f"distributed_timeout must be a number of seconds >= 1, "
                               f"got {self.distributed_timeout!r}")
        if self.distributed == "fsdp" and self.adapter == "adalora":
            raise LorakitError("distributed: fsdp does not run adapter: adalora (its rank budget reads whole "
                               "gradients, which FSDP shards); use distributed: ddp")
        if self.distributed == "fsdp" and self.optimizer != "adamw":
            raise LorakitError(f"distributed: fsdp runs optimizer: adamw only (the 8-bit state is not sharded; an "
                               f"adapter's optimizer state is small anyway); got optimizer: {self.optimizer}")
        for name in FLOAT_FIELDS:
            setattr(self, name, _as_float(name, getattr(self, name)))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise LorakitError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_seq_len", "batch_size", "gradient_accumulation_steps", "eval_every", "save_every",
                     "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise LorakitError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not _is_int(self.seed):
            raise LorakitError(f"seed must be an integer, got {self.seed!r}")
        if not _is_int(self.max_steps) or self.max_steps < 0:
            raise LorakitError(f"max_steps must be an integer >= 0 (0 = use num_epochs), got {self.max_steps!r}")
        if not self.learning_rate > 0:
            raise LorakitError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise LorakitError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.val_fraction < 1:
            raise LorakitError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not self.num_epochs > 0:
            raise LorakitError(f"num_epochs must be > 0, got {self.num_epochs!r}")
        _choice("adapter", self.adapter, tuple(ADAPTER_CONFIGS))
        for kind, config_class in ADAPTER_CONFIGS.items():
            if not isinstance(getattr(self, kind), dict):
                raise LorakitError(f"{kind} must be a mapping of {config_class.__name__} fields, "
                                   f"got {getattr(self, kind)!r}")
        self.adapter_config()  # validate early, with the key names the user wrote

    def lora_config(self) -> LoraConfig:
        """The `lora:` mapping as a LoraConfig (unknown keys are errors with a suggestion)."""
        return LoraConfig.from_dict(self.lora, strict=True, where="lora")

    def adapter_config(self, total_steps: int | None = None) -> LoraConfig | VeraConfig | AdaLoraConfig:
        """The config of the adapter to train: `adapter:` picks lora, vera or adalora, each from its mapping.

        AdaLoRA's budget schedule needs the run's length: total_step defaults to `total_steps`.
        """
        values = dict(getattr(self, self.adapter))
        if self.adapter == "adalora" and values.get("total_step") is None:
            values["total_step"] = total_steps or max(1, self.max_steps)
        return ADAPTER_CONFIGS[self.adapter].from_dict(values, strict=True, where=self.adapter)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the base is held and computed in: bf16 when `bf16`, else fp32."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def torch_device(self) -> torch.device:
        """The device to train on: `device`, with auto = CUDA when present, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LorakitError("device: cuda, but PyTorch sees no CUDA device here; set device: cpu or auto")
        return torch.device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as written to the run folder's config.yaml."""
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string: numeric strings count as numbers
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise LorakitError(f"{name} must be a number, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise LorakitError(f"{name} must be one of {[a for a in allowed if a is not None]}"
                           f"{' or null' if None in allowed else ''}, got {value!r}")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a TrainConfig; an unknown key is an error naming the closest valid one."""
    valid = [f.name for f in fields(TrainConfig)]
    for key in data:
        if key not in valid:
            raise LorakitError(f"{where}: unknown key {key!r}{_suggest(key, valid)}")
    try:
        return TrainConfig(**data)
    except LorakitError as exc:
        raise LorakitError(f"{where}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'lora.r=8' -> (['lora', 'r'], 8); the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise LorakitError(f"--set {text!r}: expected key=value, e.g. --set learning_rate=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply --set overrides to the raw dict (nested keys with dots, e.g. lora.r=8)."""
    defaults = {"lora": _default_lora, "vera": _default_vera, "adalora": _default_adalora}
    data = {**data, **{kind: dict(data.get(kind) or make()) for kind, make in defaults.items()}}
    valid = [f.name for f in fields(TrainConfig)]
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in valid:
            raise LorakitError(f"--set {text!r}: unknown key {path[0]!r}{_suggest(path[0], valid)}")
        if len(path) == 1:
            data[path[0]] = value
        elif path[0] in ADAPTER_CONFIGS and len(path) == 2:
            keys = [f.name for f in fields(ADAPTER_CONFIGS[path[0]])]
            if path[1] not in keys:
                raise LorakitError(f"--set {text!r}: unknown {path[0]} key {path[1]!r}{_suggest(path[1], keys)}")
            data[path[0]][path[1]] = value
        else:
            raise LorakitError(f"--set {text!r}: only lora.<key>, vera.<key> and adalora.<key> may be nested")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML run config (or start from defaults) and apply --set overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise LorakitError(f"{file}: no such config file")
        try:
            data = yaml.safe_load(file.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError:
            raise LorakitError(f"{file}: not UTF-8 text; save the config as UTF-8") from None
        except yaml.YAMLError as exc:
            raise LorakitError(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise LorakitError(f"{file}: expected a mapping of settings at the top level")
        base = file.parent
        for key in ("train_file", "val_file"):
            value = data.get(key)
            if isinstance(value, str) and not Path(value).exists() and (base / value).exists():
                # A path that is not there from the working folder is read relative to the config file.
                data[key] = str(base / value)
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, where=str(path) if path else "config")


# Settings a resumed run may change: the schedule and the bookkeeping. Everything else shapes the adapter,
# the data order or the optimizer state already saved in the checkpoint.
RESUME_CHANGEABLE = ("learning_rate", "max_steps", "num_epochs", "warmup_ratio", "lr_scheduler", "max_grad_norm",
                     "eval_every", "save_every", "log_every", "tensorboard", "fast_kernels", "device", "distributed",
                     "distributed_timeout", "fsdp_cpu_offload")


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if key == "lora" and isinstance(value, dict):
            flat.update({f"lora.{k}": v for k, v in LoraConfig.from_dict(value, strict=False).to_dict().items()})
        elif key in ADAPTER_CONFIGS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _with_defaults(ADAPTER_CONFIGS[key], value).items()})
        else:
            flat[key] = value
    return flat


def _with_defaults(config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with each omitted field at its default, unvalidated (AdaLoRA's total_step may still be unset)."""
    defaults = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(config_class)}
    return {**defaults, **values}


def _same_path(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str) and a != b and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def resume_changes(saved: dict[str, Any], cfg: TrainConfig, where: str) -> dict[str, list[Any]]:
    """{key: [saved, new]} for the settings `cfg` changes against the run's saved config; fixed ones raise."""
    try:
        before = _flatten(config_from_dict(saved, where).to_dict())
    except LorakitError as exc:
        raise LorakitError(f"{exc}; the run's own config is unreadable, start again with --overwrite") from None
    after = _flatten(cfg.to_dict())
    changed = {key: [before.get(key), value] for key, value in after.items()
               if key != "output_dir" and not _same_path(before.get(key), value)}
    fixed = [key for key in changed if key not in RESUME_CHANGEABLE]
    if fixed:
        what = ", ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in fixed)
        raise LorakitError(f"--resume cannot change {what}: the checkpoint's adapter, optimizer state and data "
                           f"position were made with the old value; only {', '.join(RESUME_CHANGEABLE)} may "
                           "change on resume (or start again with --overwrite)")
    return changed
