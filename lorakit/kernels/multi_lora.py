"""Many LoRA adapters in one batch: each row's low-rank update from its own adapter, over one table.

The table holds the resident adapters of one layer, padded to a common rank R: `A_table` [L, R, in] and
`B_table` [L, out, R] with each adapter's scale folded into B (padding rows and columns are zero, so a
smaller rank, or an adapter that does not target this layer, adds exactly nothing). Which rows use which
adapter is a list of entries (row, adapter slot, weight): a plain request has one entry per row, a blend
one per adapter it mixes (a weighted sum of updates, nothing merged), and a base-model row none.

- `compiled_bgmv` (CPU): the gathered form as one compiled loop that reads each entry's A and B rows where
  they lie in the table (Punica's BGMV), instead of copying them out first; for few rows per adapter.
- `segmented`: entries sorted by adapter; one pair of matmuls per distinct adapter over its rows (Punica's
  segmented matmul as a loop), added into the output with one index_add. Pays when adapters have many rows.
- `gathered`: every entry's A and B gathered into a batch and two bmm's; pays when each adapter has few
  rows (decoding with many distinct adapters), where the loop's per-adapter overhead dominates.
- `reference`: a plain loop over entries.
All three compute each entry's update as (x @ A.T) @ B.T in the table's dtype and add it in fp32 order of
entries per adapter; they agree within a rounding of the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.kernels.compile import compile_machine_check, compiled, dispatch_mode_check
from lorakit.kernels.dispatch import Kernel, call, register

OP = "multi_lora"
GATHER_MAX_ROWS_PER_ADAPTER = 16  # up to this many rows per distinct adapter, gathering beats a loop of matmuls


@dataclass(frozen=True)
class Entries:
    """Which rows take which adapter slot, with what weight: three equal-length 1-D tensors."""

    rows: torch.Tensor  # long [M], row of x
    slots: torch.Tensor  # long [M], adapter slot in the table
    weights: torch.Tensor  # float [M], the entry's weight (1 for a plain request)
    distinct: int = 0  # distinct slots, counted once when built (every layer's dispatch reads it)
    single: bool = False  # every row of x takes one slot with weight 1, in row order: one plain LoRA update
    ranks: tuple = ()  # (slot, true rank) pairs: a loop over adapters reads no padding beyond them

    @staticmethod
    def build(row_adapters: list[dict[int, float]], device: torch.device | str = "cpu",
              ranks: dict[int, int] | None = None) -> Entries:
        """From one {slot: weight} per row (empty for the base model); `ranks`: each slot's true rank, if known."""
        rows, slots, weights = [], [], []
        for row, mix in enumerate(row_adapters):
            for slot, weight in mix.items():
                rows.append(row)
                slots.append(slot)
                weights.append(weight)
        single = (len(set(slots)) == 1 and rows == list(range(len(row_adapters)))
                  and all(weight == 1.0 for weight in weights))
        return Entries(torch.tensor(rows, dtype=torch.long, device=device),
                       torch.tensor(slots, dtype=torch.long, device=device),
                       torch.tensor(weights, dtype=torch.float32, device=device), len(set(slots)), single,
                       tuple(sorted((ranks or {}).items())))

    def expand(self, tokens_per_row: int) -> Entries:
        """The entries of a [rows * tokens_per_row, in] view of x (each token of a row takes the row's adapters)."""
        if tokens_per_row == 1:
            return self
        offsets = torch.arange(tokens_per_row, device=self.rows.device)
        rows = (self.rows[:, None] * tokens_per_row + offsets).reshape(-1)
        repeat = lambda t: t[:, None].expand(-1, tokens_per_row).reshape(-1)  # noqa: E731
        return Entries(rows, repeat(self.slots), repeat(self.weights), self.distinct, self.single, self.ranks)


def multi_lora_reference(out: torch.Tensor, x: torch.Tensor, A_table: torch.Tensor, B_table: torch.Tensor,
                         entries: Entries) -> torch.Tensor:
    """out[row] += weight * B[slot] @ A[slot] @ x[row] for every entry, one at a time; returns out."""
    for row, slot, weight in zip(entries.rows.tolist(), entries.slots.tolist(), entries.weights.tolist()):
        h = x[row] @ A_table[slot].t()
        out[row] += (weight * (h @ B_table[slot].t())).to(out.dtype)
    return out


def _segmented(out, x, A_table, B_table, entries):
    ranks = dict(entries.ranks)
    if entries.single:  # one adapter for every row: a plain LoRA update, added inside the second matmul
        slot = int(entries.slots[0])
        r = ranks.get(slot, A_table.shape[1])
        return out.addmm_(x @ A_table[slot, :r].t(), B_table[slot, :, :r].t())
    order = torch.argsort(entries.slots, stable=True)
    rows, slots, weights = entries.rows[order], entries.slots[order], entries.weights[order]
    unique, counts = torch.unique_consecutive(slots, return_counts=True)
    updates = torch.empty(rows.numel(), out.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for slot, count in zip(unique.tolist(), counts.tolist()):
        segment = slice(start, start + count)
        r = ranks.get(slot, A_table.shape[1])
        h = x[rows[segment]] @ A_table[slot, :r].t()
        torch.mm(h * weights[segment, None].to(h.dtype), B_table[slot, :, :r].t(), out=updates[segment])
        start += count
    return out.index_add_(0, rows, updates.to(out.dtype))


def _gathered(out, x, A_table, B_table, entries):
    h = torch.bmm(A_table[entries.slots], x[entries.rows].unsqueeze(-1))  # [M, R, 1]
    h = h * entries.weights[:, None, None].to(h.dtype)
    updates = torch.bmm(B_table[entries.slots], h).squeeze(-1)  # [M, out]
    return out.index_add_(0, entries.rows, updates.to(out.dtype))


def _bgmv_loop(out, x, A_table, B_table, rows, slots, weights):
    h = (A_table[slots].float() * x[rows].float()[:, None, :]).sum(-1)  # [M, R]: indirect loads, no copy
    h = (h * weights[:, None]).to(A_table.dtype).float()  # rounded as the bmm path rounds it
    update = (B_table[slots].float() * h[:, None, :]).sum(-1)  # [M, out]
    return out.index_add_(0, rows, update.to(out.dtype))


_BGMV = compiled(_bgmv_loop)


def _compiled_bgmv(out, x, A_table, B_table, entries):
    return _BGMV(out, x, A_table, B_table, entries.rows, entries.slots, entries.weights)


def _bgmv_accepts(out, x, A_table, B_table, entries) -> str | None:
    if x.device.type != "cpu":
        return "not a CPU tensor"
    return _few_rows_per_adapter(out, x, A_table, B_table, entries) or dispatch_mode_check()


def _few_rows_per_adapter(out, x, A_table, B_table, entries) -> str | None:
    distinct = entries.distinct
    if distinct and entries.slots.numel() <= GATHER_MAX_ROWS_PER_ADAPTER * distinct:
        return None
    return f"more than {GATHER_MAX_ROWS_PER_ADAPTER} rows per adapter: the segmented loop is cheaper"


register(OP, [
    Kernel("compiled_bgmv", _compiled_bgmv, compile_machine_check, _bgmv_accepts),
    Kernel("gathered", _gathered, accepts=_few_rows_per_adapter),
    Kernel("segmented", _segmented),
    Kernel("reference", multi_lora_reference),
])


def multi_lora(out: torch.Tensor, x: torch.Tensor, A_table: torch.Tensor, B_table: torch.Tensor,
               entries: Entries) -> torch.Tensor:
    """Add each entry's weighted low-rank update to out ([N, out], in place) from x [N, in]; returns out."""
    if entries.rows.numel() == 0:
        return out
    return call(OP, out, x, A_table, B_table, entries)
