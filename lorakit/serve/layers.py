"""The engine's adapted layer: a base linear run once for the whole batch, plus each row's adapters from a table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.kernels.multi_lora import Entries, Tables, multi_lora


@dataclass
class BatchAdapters:
    """What the current forward's rows use, shared by every MultiLoraLinear: set by the engine per step."""

    entries: Entries | None = None  # one per (row, adapter) of the batch's rows; None: no row uses an adapter


class MultiLoraLinear(nn.Module):
    """base(x) plus, for each row, its adapters' updates from this layer's `Tables`."""

    def __init__(self, base: nn.Module, batch: BatchAdapters, slots: int, max_rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base
        self.batch = batch
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        empty = Tables.zeros(slots, max_rank, base.in_features, base.out_features, dtype, device)
        self.register_buffer("A_rows", empty.A_rows, persistent=False)
        self.register_buffer("B_rows", empty.B_rows, persistent=False)
        self.max_rank = max_rank

    @property
    def tables(self) -> Tables:
        """The resident adapters' table (views of this module's buffers)."""
        return Tables(self.A_rows, self.B_rows, self.max_rank)

    def load_slot(self, slot: int, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Write one adapter's (A, scale * B) into `slot`, zero-padded; None zeroes the slot (not targeted here)."""
        self.tables.load(slot, *(factors if factors is not None else (None, None)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base product for every row once, then the rows' low-rank updates in one batched call."""
        out = self.base_layer(x)
        entries = self.batch.entries
        if entries is None:
            return out
        x3d = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() != 2 else x[:, None]
        multi_lora(out.view(x3d.shape[0], x3d.shape[1], out.shape[-1]), x3d.to(self.A_rows.dtype), self.tables,
                   entries)
        return out
