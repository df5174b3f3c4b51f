"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, y = base(x) + (x @ (A*E).T @ B.T) * alpha / (ranknum + 1e-5),
whose singular values E are pruned during training to a budget of target_r per layer on average.

Field names, inits, forward and tensor names are PEFT's (peft/tuners/adalora), so adapters move between the two.
The budget schedule and the weighted orthogonality regulariser live in adalora_budget.py.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lorakit.config import TARGET_SHORTHANDS, config_from_mapping
from lorakit.errors import LorakitError
from lorakit.lora import LoraLayer, _adapter_dtype, _param_device, is_conv1d, is_linear_like

ADALORA_BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class AdaLoraConfig:
    """Hyper-parameters of one AdaLoRA adapter; names and defaults are PEFT's AdaLoraConfig's.

    `rank_pattern` is AdaLoRA's, not LoRA's: module path + ".lora_E" -> one keep flag per initial rank, written
    by the budget schedule and saved with the (pruned) adapter. PEFT's LoRA-only fields are left out.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    init_lora_weights: bool = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        for name in ("target_r", "init_r", "deltaT"):
            _check_int(name, getattr(self, name), 1)
        for name in ("tinit", "tfinal"):
            _check_int(name, getattr(self, name), 0)
        if self.total_step is None:
            raise LorakitError("AdaLoraConfig.total_step is required (the budget schedule needs the run's length); "
                               "set it to the number of optimizer steps")
        _check_int("total_step", self.total_step, 1)
        if self.tinit >= self.total_step - self.tfinal:
            end = self.total_step - self.tfinal
            raise LorakitError(f"AdaLoraConfig: tinit={self.tinit} >= total_step - tfinal={end} leaves no "
                               "budgeting phase; lower tinit/tfinal or raise total_step")
        if self.target_r > self.init_r:
            raise LorakitError(f"AdaLoraConfig.target_r={self.target_r} exceeds init_r={self.init_r}; the budget only "
                               "shrinks ranks: set target_r <= init_r")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise LorakitError(f"AdaLoraConfig.{name} must be in (0, 1) (an EMA factor), got {value!r}")
        _check_number("orth_reg_weight", self.orth_reg_weight, lambda v: v >= 0, ">= 0")
        _check_number("lora_alpha", self.lora_alpha, lambda v: v > 0, "> 0")
        _check_number("lora_dropout", self.lora_dropout, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.bias not in ADALORA_BIAS_CHOICES:
            raise LorakitError(f"AdaLoraConfig.bias must be one of {ADALORA_BIAS_CHOICES}, got {self.bias!r}")
        for name in ("init_lora_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise LorakitError(f"AdaLoraConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise LorakitError("AdaLoraConfig.layers_pattern is set but layers_to_transform is not; "
                               "set both or neither")
        _check_rank_pattern(self.rank_pattern, self.init_r)
        _check_targets(self.target_modules, self.exclude_modules, self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True, where: str = "AdaLoraConfig") -> AdaLoraConfig:
        """Build from a dict; unknown keys are an error (strict) or dropped (PEFT files carry extra keys)."""
        return config_from_mapping(cls, values, strict, where)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LorakitError(f"AdaLoraConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, ok, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise LorakitError(f"AdaLoraConfig.{name} must be a number {expected}, got {value!r}")


def _check_rank_pattern(rank_pattern: Any, init_r: int) -> None:
    if rank_pattern is None:
        return
    if not isinstance(rank_pattern, dict):
        raise LorakitError(f"AdaLoraConfig.rank_pattern must map '<module>.lora_E' to keep flags, got {rank_pattern!r}")
    for key, flags in rank_pattern.items():
        if not isinstance(flags, list) or len(flags) != init_r or not all(isinstance(f, bool) for f in flags):
            raise LorakitError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of init_r={init_r} true/false "
                               f"keep flags, got {flags!r}")


def _check_targets(*values: Any) -> None:
    for name, value in zip(("target_modules", "exclude_modules", "modules_to_save"), values):
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise LorakitError(f"AdaLoraConfig.{name} must be a list of module names or a regex string, got {value!r}")
    targets = values[0]
    if isinstance(targets, str) and targets not in TARGET_SHORTHANDS:
        try:
            re.compile(targets)
        except re.error as exc:
            raise LorakitError(f"AdaLoraConfig.target_modules {targets!r} is not a valid regex ({exc})") from None


def adalora_config_from_peft_dict(data: dict[str, Any], where: str) -> AdaLoraConfig:
    """Read PEFT's AdaLoRA adapter_config.json dict; LoRA options AdaLoRA can't honour are errors."""
    for key, default in {"use_dora": False, "use_rslora": False, "lora_bias": False}.items():
        if data.get(key, default) != default:
            raise LorakitError(f"{where}: {key}={data[key]!r} is not supported for AdaLoRA (only {default!r})")
    if isinstance(data.get("target_modules"), list):
        data = {**data, "target_modules": sorted(data["target_modules"])}
    return AdaLoraConfig.from_dict(data, strict=False, where=where)


class AdaLoraLinear(LoraLayer):
    """AdaLoRA around nn.Linear, transformers Conv1D or a 4-bit linear: A [r, in], E [r, 1], B [out, r]."""

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_linear_like(base_layer):
            raise LorakitError(f"AdaLoRA adapts linear layers only (Linear, transformers Conv1D, 4-bit Linear), "
                               f"not {type(base_layer).__name__}; leave it out of target_modules")
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = (int(d) for d in base_layer.weight.shape)
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        # PEFT's registration order (E, A, B, ranknum): the in-memory parameter names and order match.
        self.lora_E = nn.ParameterDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: bool = True) -> None:
        """Create adapter `name` with rank r: E zero, A and B N(0, 0.02) (PEFT's init), ranknum = r."""
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha if alpha > 0 else float(r)  # PEFT's: alpha itself; ranknum divides
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PEFT's draws from the global RNG, in its order, so that seeded runs give the same adapter.
        A, E, B = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        ranknum = torch.randn(1).fill_(float(r))
        if init:
            E.zero_()
            A.normal_(0.0, 0.02)
            B.normal_(0.0, 0.02)
        dtype = _adapter_dtype(self.base_layer)
        if dtype is not None:
            # PEFT casts new adapters to a half base's dtype, then back up to fp32: round through it.
            A, E, B = (t.to(dtype).float() for t in (A, E, B))
        device = _param_device(self.base_layer)
        self.lora_A[name] = nn.Parameter(A.to(device))
        self.lora_E[name] = nn.Parameter(E.to(device))
        self.lora_B[name] = nn.Parameter(B.to(device))
        self.ranknum[name] = nn.Parameter(ranknum.to(device), requires_grad=False)

    def keep_ranks(self, name: str, keep: torch.Tensor) -> None:
        """Shrink adapter `name` to the ranks flagged in `keep` [r] (bool); ranknum keeps the initial rank."""
        keep = keep.to(self.lora_A[name].device)
        for table, rows in ((self.lora_A, True), (self.lora_E, True), (self.lora_B, False)):
            tensor = table[name]
            kept = tensor.detach()[keep] if rows else tensor.detach()[:, keep]
            table[name] = nn.Parameter(kept.clone(), requires_grad=tensor.requires_grad)
        self.r[name] = int(keep.sum())

    def delete(self, name: str) -> None:
        """Remove one adapter from this layer (unmerging it first)."""
        super().delete(name)
        for table in (self.lora_E, self.ranknum):
            if name in table:
                del table[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ (A*E) * alpha / (ranknum + 1e-5) in the base weight's layout ([in, out] for Conv1D), fp32."""
        A, E, B = self.lora_A[name].float(), self.lora_E[name].float(), self.lora_B[name].float()
        delta = (B @ (A * E)) * self.scaling[name] / (self.ranknum[name].float() + 1e-5)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base output plus each live adapter's SVD-form update, in PEFT's order of operations."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._live_adapters():
            A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            x = x.to(A.dtype)
            update = (self.lora_dropout[name](x) @ (A * E).T @ B.T) * self.scaling[name] / (self.ranknum[name] + 1e-5)
            result = (result + update).to(result.dtype)  # PEFT adds in place: computed wide, stored in result's dtype
        return result

    def extra_repr(self) -> str:
        return f"adalora ranks={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"


def adalora_layers(model: nn.Module, name: str) -> list[tuple[str, AdaLoraLinear]]:
    """(path, layer) of every layer holding AdaLoRA adapter `name`, in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdaLoraLinear) and name in m.scaling]


def orthogonality_penalty(model: nn.Module, name: str) -> torch.Tensor:
    """Mean over every A and B of adapter `name` of ||P P^T - I||_F (A @ A.T for A, B.T @ B for B), unweighted."""
    total, count = 0, 0
    for _, layer in adalora_layers(model, name):
        for cov in (layer.lora_A[name] @ layer.lora_A[name].T, layer.lora_B[name].T @ layer.lora_B[name]):
            eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
            total, count = total + torch.linalg.norm(cov - eye, ord="fro"), count + 1  # PEFT's summation order
    if not count:
        raise LorakitError(f"no AdaLoRA adapter named {name!r} on this model")
    return total / count
