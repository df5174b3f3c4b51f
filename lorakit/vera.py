"""VeRA (Kopiczko et al., 2023): one frozen random pair A [r, max_in], B [max_out, r] shared by every adapted
layer, and two trainable vectors per layer:  y = base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x))).

Field names, seeding and tensor names are PEFT's (peft/tuners/vera), so adapters move between the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import TARGET_SHORTHANDS, config_from_mapping
from lorakit.errors import LorakitError
from lorakit.lora import LoraLayer, _adapter_dtype, _param_device, is_conv1d, is_linear_like

VERA_BIAS_CHOICES = ("none", "all", "vera_only")


@dataclass
class VeraConfig:
    """Hyper-parameters of one VeRA adapter; names and defaults are PEFT's VeraConfig's."""

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    # Not a field: PEFT's VeraConfig has no exclude_modules, and target resolution reads it as "none".
    exclude_modules = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LorakitError(f"VeraConfig.r must be an integer >= 1 (e.g. 256), got {self.r!r}")
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or not -(2**63) <= key < 2**64:
            raise LorakitError(f"VeraConfig.projection_prng_key must be an integer seed, got {key!r}")
        for flag in ("save_projection", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise LorakitError(f"VeraConfig.{flag} must be true or false, got {getattr(self, flag)!r}")
        dropout = self.vera_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise LorakitError(f"VeraConfig.vera_dropout must be in [0, 1), got {dropout!r}")
        d_initial = self.d_initial
        if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
            raise LorakitError(f"VeraConfig.d_initial must be a finite number (<= 0.1 advised), got {d_initial!r}")
        if self.bias not in VERA_BIAS_CHOICES:
            raise LorakitError(f"VeraConfig.bias must be one of {VERA_BIAS_CHOICES}, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise LorakitError("VeraConfig.layers_pattern is set but layers_to_transform is not; set both or neither")
        _check_targets(self.target_modules, self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True, where: str = "VeraConfig") -> VeraConfig:
        """Build from a dict; unknown keys are an error (strict) or dropped (PEFT files carry extra keys)."""
        return config_from_mapping(cls, values, strict, where)


def _check_targets(target_modules: Any, modules_to_save: Any) -> None:
    for name, value in (("target_modules", target_modules), ("modules_to_save", modules_to_save)):
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise LorakitError(f"VeraConfig.{name} must be a list of module names or a regex string, got {value!r}")
    if isinstance(target_modules, str) and target_modules not in TARGET_SHORTHANDS:
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise LorakitError(f"VeraConfig.target_modules {target_modules!r} is not a valid regex ({exc}); "
                               f"give a list of module names, a regex, or 'all-linear'") from None


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # PEFT's _kaiming_init: gain sqrt(2), fan_in = shape[1], the bound computed in this order for equal bits.
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared pair: A [r, max_in] then B [max_out, r] from one CPU generator seeded with `key` (fp32)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_A = _kaiming_uniform((r, max_in), generator)
    vera_B = _kaiming_uniform((max_out, r), generator)
    return vera_A, vera_B


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, transformers Conv1D ([in, out] weight) or 4-bit linear."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    return module.in_features, module.out_features


class VeraProjections(nn.Module):
    """One adapter's frozen vera_A / vera_B, a single module shared as a child by every layer it adapts.

    Buffers are non-persistent: the model's own state_dict stays free of N copies; the adapter file stores the
    pair once (PEFT's `base_model.vera_A` / `base_model.vera_B`), or not at all, since the key regenerates it.
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)


class VeraLinear(LoraLayer):
    """VeRA around nn.Linear, transformers Conv1D or a 4-bit linear; several named adapters, as LoraLayer."""

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_linear_like(base_layer):
            raise LorakitError(f"VeRA adapts linear layers only (Linear, transformers Conv1D, 4-bit Linear), "
                               f"not {type(base_layer).__name__}; leave it out of target_modules")
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_projections = nn.ModuleDict()

    def add(self, name: str, projections: VeraProjections, dropout: float = 0.0, d_initial: float = 0.1,
            init_weights: bool = True) -> None:
        """Create adapter `name` over the shared `projections`: lambda_b zeros [out], lambda_d d_initial [r]."""
        r, max_in = projections.vera_A.shape
        if max_in < self.in_features or projections.vera_B.shape[0] < self.out_features:
            raise LorakitError(f"VeRA projections {tuple(projections.vera_A.shape)}/{tuple(projections.vera_B.shape)} "
                               f"are too small for a [{self.out_features}, {self.in_features}] layer")
        self.r[name], self.lora_alpha[name] = r, 1.0
        self.scaling[name] = 1.0  # VeRA has no alpha/r; the entry marks the adapter as held by this layer
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_projections[name] = projections
        device = _param_device(self.base_layer)
        # PEFT's draws, in its order (ones, then randn from the global RNG), so seeded runs stay in step.
        lambda_b = torch.ones(self.out_features)
        lambda_d = torch.randn(r)
        if init_weights:
            lambda_b.zero_()
            lambda_d.fill_(d_initial)
        dtype = _adapter_dtype(self.base_layer)
        if dtype is not None:
            # PEFT casts new adapters to a half base's dtype, then back up to fp32: round through it.
            lambda_b, lambda_d = lambda_b.to(dtype).float(), lambda_d.to(dtype).float()
        self.vera_lambda_b[name] = nn.Parameter(lambda_b.to(device))
        self.vera_lambda_d[name] = nn.Parameter(lambda_d.to(device))

    def delete(self, name: str) -> None:
        """Remove one adapter from this layer (unmerging it first)."""
        super().delete(name)
        for container in (self.vera_lambda_b, self.vera_lambda_d, self.vera_projections):
            if name in container:
                del container[name]

    def sliced_projections(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's views of the shared pair: A[:, :in] and B[:out, :]."""
        projections = self.vera_projections[name]
        return projections.vera_A[:, : self.in_features], projections.vera_B[: self.out_features, :]

    def delta_weight(self, name: str) -> torch.Tensor:
        """(lambda_b * B) @ (lambda_d * A) in the base weight's layout ([in, out] for Conv1D), fp32."""
        sliced_A, sliced_B = self.sliced_projections(name)
        lambda_b = self.vera_lambda_b[name].float().unsqueeze(-1)
        lambda_d = self.vera_lambda_d[name].float().unsqueeze(-1)
        delta = (lambda_b * sliced_B.float().to(lambda_b.device)) @ (lambda_d * sliced_A.float().to(lambda_b.device))
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base output plus each live adapter's scaled random projection (PEFT's dtype steps)."""
        input_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return result.to(input_dtype)
        result_dtype = result.dtype
        for name in live:
            sliced_A, sliced_B = self.sliced_projections(name)
            lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            x = x.to(lambda_d.dtype)
            hidden = lambda_d * F.linear(self.lora_dropout[name](x), sliced_A.to(x.device))
            result = result + lambda_b * F.linear(hidden, sliced_B.to(x.device))
        return result.to(result_dtype).to(input_dtype)

    def extra_repr(self) -> str:
        return f"vera adapters={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"
