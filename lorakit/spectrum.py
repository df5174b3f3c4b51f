"""Adapter diagnostics: ranks, parameter counts, size on disk, and the singular values of scale*B@A."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.adapter_types import adapter_kind
from lorakit.errors import LorakitError
from lorakit.lora import lora_scale
from lorakit.peft_format import (
    BASE_NAME_KEY,
    CONFIG_NAME,
    FINGERPRINT_KEY,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_metadata,
    read_adapter_tensors,
)
from lorakit.peft_keys import LINEAR_FACTORS, parse_peft_key


def delta_singular_values(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of scale*B@A from two QRs of the thin factors (never forms the full matrix)."""
    _, rb = torch.linalg.qr(B.float())
    _, ra = torch.linalg.qr(A.float().T)
    return torch.linalg.svdvals(rb @ ra.T) * scale


def effective_rank(values: torch.Tensor, rel: float = 0.01) -> int:
    """Number of singular values above rel * the largest: how much of r the update uses."""
    return int((values > rel * values.max()).sum()) if values.numel() and values.max() > 0 else 0


def linear_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A, B) of every Linear/Conv LoRA layer in a saved adapter, sorted by path."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is not None:
            module, param = parsed
            factors.setdefault(module, {})[param] = tensor
    a_param, b_param = LINEAR_FACTORS
    return {module: (found[a_param], found[b_param]) for module, found in sorted(factors.items()) if a_param in found}


def rank_mismatches(config, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[str, int, int]]:
    """(module, config rank, tensor rank) for every layer whose A and B do not have the config's rank."""
    mismatched = []
    for module, (A, B) in layers.items():
        said = config.rank_for(module)
        if A.shape[0] != said or B.shape[1] != said:
            mismatched.append((module, said, A.shape[0]))
    return mismatched


def _tensor_line(tensors: dict[str, torch.Tensor], size: int) -> str:
    n_params = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return f"  parameters: {n_params:,d}   dtypes: {', '.join(dtypes)}   size on disk: {size / 1e6:.2f} MB"


def describe_other(folder: Path, config, tensors: dict[str, torch.Tensor], size: int) -> list[str]:
    """The summary of a VeRA or AdaLoRA folder: its settings, tensors and what training did to them."""
    targets = config.target_modules if isinstance(config.target_modules, str) else \
        f"{len(config.target_modules or [])} entries"
    by_suffix = {}
    for key, tensor in tensors.items():
        by_suffix.setdefault(key.rsplit(".", 1)[-1], []).append(tensor)
    if adapter_kind(config) == "VERA":
        lambda_b, lambda_d = by_suffix.get("vera_lambda_b", []), by_suffix.get("vera_lambda_d", [])
        lines = [f"adapter: {folder}",
                 f"  peft_type VERA  r={config.r}  d_initial={config.d_initial}  "
                 f"projection_prng_key={config.projection_prng_key}  save_projection={config.save_projection}  "
                 f"target_modules: {targets}",
                 f"  adapted layers: {len(lambda_b)}   " + _tensor_line(tensors, size).strip()]
        if lambda_b:
            b_max = max(float(t.abs().max()) for t in lambda_b)
            d_mean = sum(float(t.float().mean()) for t in lambda_d) / max(1, len(lambda_d))
            lines.append(f"  |lambda_b| max {b_max:.4g}; lambda_d mean {d_mean:.4g}")
            if b_max == 0:
                lines.append("  all updates are zero: lambda_b is still at its zero init (untrained adapter)")
        return lines
    energies = by_suffix.get("lora_E", [])
    kept = [sum(flags) for flags in (config.rank_pattern or {}).values()] or [t.shape[0] for t in energies]
    lines = [f"adapter: {folder}",
             f"  peft_type ADALORA  init_r={config.init_r}  target_r={config.target_r}  "
             f"lora_alpha={config.lora_alpha}  total_step={config.total_step}  target_modules: {targets}",
             f"  adapted layers: {len(energies)}   " + _tensor_line(tensors, size).strip()]
    if kept:
        lines.append(f"  kept ranks (rank_pattern): mean {sum(kept) / len(kept):.2f}, min {min(kept)}, "
                     f"max {max(kept)} of init_r {config.init_r}")
    return lines


def describe_adapter(path: str | os.PathLike, per_layer: bool = False) -> str:
    """A readable summary of an adapter folder (config, ranks, counts, size, spectrum)."""
    folder = Path(path)
    if folder.is_file():
        raise LorakitError(f"{folder} is a file; pass the adapter folder (the one holding {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME})")
    if not folder.is_dir():
        raise LorakitError(f"{folder}: no such adapter folder")
    config = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    size = sum((folder / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME))
    if adapter_kind(config) != "LORA":
        return "\n".join(describe_other(folder, config, tensors, size))
    n_params = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    layers = linear_factors(tensors)
    targets = config.target_modules if isinstance(config.target_modules, str) else \
        f"{len(config.target_modules or [])} entries"
    lines = [
        f"adapter: {folder}",
        f"  peft_type LORA{' (DoRA)' if config.use_dora else ''}"
        f"  r={config.r}  lora_alpha={config.lora_alpha}  rslora={config.use_rslora}  "
        f"dropout={config.lora_dropout}  target_modules: {targets}",
        f"  adapted layers: {len(layers)}   parameters: {n_params:,d}   dtypes: {', '.join(dtypes)}   "
        f"size on disk: {size / 1e6:.2f} MB",
    ]
    if config.rank_pattern:
        lines.append(f"  rank_pattern: {config.rank_pattern}")
    mismatched = rank_mismatches(config, layers)
    if mismatched:
        module, said, stored = mismatched[0]
        lines.append(f"  MISMATCH: {len(mismatched)} of {len(layers)} layers have tensors of another rank than "
                     f"{CONFIG_NAME} says (e.g. {module}: config r={said}, tensors r={stored}); the file pair "
                     "does not belong together, and loading it will fail")
    metadata = read_adapter_metadata(folder)
    if FINGERPRINT_KEY in metadata:
        lines.append(f"  trained on: {metadata.get(BASE_NAME_KEY, '?')} (base fingerprint {metadata[FINGERPRINT_KEY]})")
    ranks, norms = [], []
    for module, (A, B) in layers.items():
        if A.dim() != 2:
            continue
        r = A.shape[0]  # what the tensors hold; a config that disagrees is reported above
        values = delta_singular_values(B, A, lora_scale(config.alpha_for(module), r, config.use_rslora))
        ranks.append(effective_rank(values))
        norms.append(float(values.norm()))
        if per_layer:
            top = ", ".join(f"{v:.3g}" for v in values[:4].tolist())
            lines.append(f"  {module:55s} r={r:<3d} eff.rank={ranks[-1]:<3d} |dW|_F={norms[-1]:.4g}  sv: {top}")
    if ranks:
        lines.append(f"  effective rank (sv > 1% of max): mean {sum(ranks) / len(ranks):.1f}, "
                     f"max {max(ranks)};  |scale*B@A|_F mean {sum(norms) / len(norms):.4g}")
        if max(norms) == 0:
            lines.append("  all updates are zero: B is still at its zero init (untrained adapter)")
    return "\n".join(lines)
