"""DoRA's weight algebra (Liu et al. 2024): W' = (m / ||W + ΔW||_row) · (W + ΔW), and back.

The magnitude m is a module with one parameter `weight` [out], so its state-dict key is PEFT's
`lora_magnitude_vector.<adapter>.weight` (saved without the adapter name and without `.weight`).
"""

from __future__ import annotations

import torch
from torch import nn


class Magnitude(nn.Module):
    """DoRA's trainable per-output-row magnitude m, initialised to the row norms of W + s·B·A."""

    def __init__(self, norm: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.detach().clone())

    def extra_repr(self) -> str:
        return f"out_features={self.weight.numel()}"


def _rows(factor: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    # Output rows are dim 0 of an [out, in] weight and dim 1 of a Conv1D [in, out] one.
    return factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1)


def fold_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
              fan_in_fan_out: bool = False) -> torch.Tensor:
    """(m / n) · (W + ΔW) in W's layout, fp32; `norm` is ||W_bare + ΔW|| per row of the unmerged W."""
    factor = magnitude.detach().float() / norm
    return _rows(factor, fan_in_fan_out) * (weight + delta)


def unfold_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """The inverse of fold_dora with the same norm: W' / (m / n) − ΔW."""
    factor = magnitude.detach().float() / norm
    return weight / _rows(factor, fan_in_fan_out) - delta
