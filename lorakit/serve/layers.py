"""The engine's adapted layer: a base linear run once for the whole batch, plus each row's adapters from a table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.kernels.multi_lora import Entries, multi_lora


@dataclass
class BatchAdapters:
    """What the current forward's rows use, shared by every MultiLoraLinear: set by the engine per step."""

    entries: Entries | None = None  # one per (row, adapter) of the batch's rows
    rank: int = 0  # the largest rank among the adapters the rows use: the tables are read up to it
    _expanded: dict = field(default_factory=dict)

    def set(self, entries: Entries | None, rank: int) -> None:
        """The rows' adapters for the next forward."""
        self.entries, self.rank, self._expanded = entries, rank, {}

    def for_tokens(self, tokens: int) -> Entries:
        """The entries over a [rows * tokens, in] input, built once per forward for all layers."""
        if tokens not in self._expanded:
            self._expanded[tokens] = self.entries.expand(tokens)
        return self._expanded[tokens]


class MultiLoraLinear(nn.Module):
    """base(x) plus, for each row, its adapters' updates: tables [slots, R, in] and [slots, out, R]."""

    def __init__(self, base: nn.Module, batch: BatchAdapters, slots: int, max_rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base
        self.batch = batch
        fan_in, fan_out = base.in_features, base.out_features
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.register_buffer("A_table", torch.zeros(slots, max_rank, fan_in, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("B_table", torch.zeros(slots, fan_out, max_rank, dtype=dtype, device=device),
                             persistent=False)

    def load_slot(self, slot: int, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Write one adapter's (A, scale * B) into `slot`, zero-padded; None zeroes the slot (not targeted here)."""
        self.A_table[slot].zero_()
        self.B_table[slot].zero_()
        if factors is not None:
            A, B = factors
            self.A_table[slot, : A.shape[0]].copy_(A)
            self.B_table[slot, :, : B.shape[1]].copy_(B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base product for every row once, then the rows' low-rank updates in one batched call."""
        out = self.base_layer(x)
        entries, rank = self.batch.entries, self.batch.rank
        if entries is None or rank == 0:
            return out
        tokens = x.shape[1] if x.dim() == 3 else 1
        x2d, out2d = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        multi_lora(out2d, x2d.to(self.A_table.dtype), self.A_table[:, :rank], self.B_table[:, :, :rank],
                   self.batch.for_tokens(tokens))
        return out
