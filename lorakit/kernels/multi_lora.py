"""Many LoRA adapters in one batch: each row's low-rank update from its own adapter, over one table.

A layer's resident adapters lie in `Tables`: R rows of A ([in] each) and R rows of scale * B^T ([out] each)
per slot, then one shared zero row. An adapter of rank r < R fills its first r rows, the rest stay zero,
so a smaller rank, or an adapter that does not target this layer, adds exactly nothing. Which rows use
which adapter is a list of entries (row, slot, weight): a plain request has one entry per row, a blend
one per adapter it mixes (a weighted sum of updates, nothing merged), and a base-model row none. x and
out are [rows, tokens, features]: a decoding step has one token per row, a prefill chunk many.

- `compiled_bgmv` (CPU, one token per row): one compiled loop that reads each entry's A and B rows where
  they lie in the table (Punica's BGMV), up to the entry's own rank: rows past it are read from the
  shared zero row, which stays in cache, so memory traffic follows the true ranks, not R.
- `gathered`: every entry's A and B gathered into a batch and two bmm's over its tokens; for few rows per
  adapter (a prefill chunk over many distinct adapters, or decoding without a compiler).
- `segmented`: entries sorted by adapter; one pair of matmuls per distinct adapter over its rows (Punica's
  segmented matmul as a loop), reading each adapter's true rank. Pays when adapters have many rows; one
  adapter for every row is a plain LoRA update.
- `reference`: a plain loop over entries.
All compute each entry's update as (x @ A.T) @ B.T in the table's dtype, the low-rank product rounded to
it once; they agree within a rounding of the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.kernels.compile import compile_machine_check, compiled, dispatch_mode_check
from lorakit.kernels.dispatch import Kernel, call, register

OP = "multi_lora"
GATHER_MAX_ROWS_PER_ADAPTER = 16  # up to this many rows per distinct adapter, gathering beats a loop of matmuls


@dataclass(frozen=True)
class Tables:
    """One layer's adapter table: A_rows [slots * R + 1, in] and B_rows (scale * B^T) [slots * R + 1, out]."""

    A_rows: torch.Tensor
    B_rows: torch.Tensor
    rank: int  # R, rows per slot

    @staticmethod
    def zeros(slots: int, rank: int, fan_in: int, fan_out: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> Tables:
        """An empty table of `slots` adapters of rank up to `rank`."""
        return Tables(torch.zeros(slots * rank + 1, fan_in, dtype=dtype, device=device),
                      torch.zeros(slots * rank + 1, fan_out, dtype=dtype, device=device), rank)

    @property
    def A(self) -> torch.Tensor:
        """[slots, R, in] view of the slots' A rows."""
        return self.A_rows[:-1].view(-1, self.rank, self.A_rows.shape[1])

    @property
    def B(self) -> torch.Tensor:
        """[slots, R, out] view of the slots' scale * B^T rows."""
        return self.B_rows[:-1].view(-1, self.rank, self.B_rows.shape[1])

    def load(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """Write A [r, in] and scale * B [out, r] into `slot`, the rest zero; None zeroes the slot."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        if A is not None:
            self.A[slot, : A.shape[0]].copy_(A)
            self.B[slot, : B.shape[1]].copy_(B.t())


@dataclass(frozen=True)
class Entries:
    """Which rows take which adapter slot, with what weight: equal-length 1-D tensors, plus facts counted once."""

    rows: torch.Tensor  # long [M], row of x
    slots: torch.Tensor  # long [M], adapter slot in the table
    weights: torch.Tensor  # float [M], the entry's weight (1 for a plain request)
    ranks: torch.Tensor  # long [M], the true rank of the entry's adapter (a huge value when unknown)
    distinct: int = 0  # distinct slots (every layer's dispatch reads it)
    single: bool = False  # every row of x takes one slot with weight 1, in row order: one plain LoRA update
    one_per_row: bool = False  # entry i is row i, for every row: updates can be added without an index
    slot_ranks: tuple = ()  # (slot, true rank) pairs, where known
    max_rank: int | None = None  # the largest true rank among the entries, where known

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
        ranks = ranks or {}
        unknown = 2**31 - 1
        one_per_row = rows == list(range(len(row_adapters)))
        single = len(set(slots)) == 1 and one_per_row and all(weight == 1.0 for weight in weights)
        known = all(slot in ranks for slot in slots)
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        return Entries(as_tensor(rows, torch.long), as_tensor(slots, torch.long), as_tensor(weights, torch.float32),
                       as_tensor([ranks.get(slot, unknown) for slot in slots], torch.long), len(set(slots)),
                       single, one_per_row, tuple(sorted(ranks.items())),
                       max((ranks[slot] for slot in slots), default=0) if known else None)

    def rank_for(self, tables: Tables) -> int:
        """Table rows to read per slot for these entries: the largest true rank, or R when unknown."""
        return tables.rank if self.max_rank is None else min(self.max_rank, tables.rank)


def multi_lora_reference(out: torch.Tensor, x: torch.Tensor, tables: Tables, entries: Entries) -> torch.Tensor:
    """out[row] += weight * B[slot] @ A[slot] @ x[row] for every entry, one at a time; returns out."""
    A, B = tables.A, tables.B
    for row, slot, weight in zip(entries.rows.tolist(), entries.slots.tolist(), entries.weights.tolist()):
        h = x[row] @ A[slot].t()
        out[row] += (weight * (h @ B[slot])).to(out.dtype)
    return out


def _segmented(out, x, tables, entries):
    ranks = dict(entries.slot_ranks)
    A, B = tables.A, tables.B
    fan_in, fan_out = x.shape[-1], out.shape[-1]
    if entries.single:  # one adapter for every row: a plain LoRA update, added inside the second matmul
        slot = int(entries.slots[0])
        r = min(ranks.get(slot, tables.rank), tables.rank)
        out.view(-1, fan_out).addmm_(x.reshape(-1, fan_in) @ A[slot, :r].t(), B[slot, :r])
        return out
    order = torch.argsort(entries.slots, stable=True)
    rows, slots, weights = entries.rows[order], entries.slots[order], entries.weights[order]
    unique, counts = torch.unique_consecutive(slots, return_counts=True)
    tokens = x.shape[1]
    updates = torch.empty(rows.numel(), tokens, fan_out, dtype=x.dtype, device=x.device)
    start = 0
    for slot, count in zip(unique.tolist(), counts.tolist()):
        segment = slice(start, start + count)
        r = min(ranks.get(slot, tables.rank), tables.rank)
        h = (x[rows[segment]].reshape(-1, fan_in) @ A[slot, :r].t()).view(count, tokens, r)
        h = h * weights[segment, None, None].to(h.dtype)
        torch.mm(h.view(-1, r), B[slot, :r], out=updates[segment].view(-1, fan_out))
        start += count
    return out.index_add_(0, rows, updates.to(out.dtype))


def _gathered(out, x, tables, entries):
    r = entries.rank_for(tables)
    A, B = tables.A[:, :r], tables.B[:, :r]
    rows = x if entries.one_per_row else x[entries.rows]
    h = torch.bmm(rows, A[entries.slots].transpose(1, 2))  # [M, tokens, r]
    h = h * entries.weights[:, None, None].to(h.dtype)
    if entries.one_per_row and out.dtype == h.dtype:
        return out.baddbmm_(h, B[entries.slots])
    return out.index_add_(0, entries.rows, torch.bmm(h, B[entries.slots]).to(out.dtype))


def _bgmv_loop(out, x, A_rows, B_rows, rows, slots, weights, ranks, rank: int):
    k = torch.arange(rank, device=x.device)
    zero_row = A_rows.shape[0] - 1
    # Rows past an entry's rank read the shared zero row (in cache), not the slot's padding (in memory).
    index = torch.where(k < ranks[:, None], slots[:, None] * rank + k, zero_row)  # [M, R]
    h = (A_rows[index].float() * x[rows].float()[:, None, :]).sum(-1)  # [M, R]: indirect loads, no copy
    h = (h * weights[:, None]).to(A_rows.dtype).float()  # rounded as the bmm path rounds it
    # Unrolled over R so the compiled loop runs along each B row (contiguous), not across rows.
    update = B_rows[index[:, 0]].float() * h[:, :1]
    for j in range(1, rank):
        update = update + B_rows[index[:, j]].float() * h[:, j:j + 1]
    return out.index_add_(0, rows, update.to(out.dtype))


_BGMV = compiled(_bgmv_loop)


def _compiled_bgmv(out, x, tables, entries):
    _BGMV(out[:, 0], x[:, 0], tables.A_rows, tables.B_rows, entries.rows, entries.slots, entries.weights,
          entries.ranks, tables.rank)
    return out


def _bgmv_accepts(out, x, tables, entries) -> str | None:
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if x.shape[1] != 1:
        return "more than one token per row: a batched matmul reads each adapter once per row"
    return _few_rows_per_adapter(out, x, tables, entries) or dispatch_mode_check()


def _few_rows_per_adapter(out, x, tables, entries) -> str | None:
    distinct = entries.distinct
    if distinct and entries.slots.numel() <= GATHER_MAX_ROWS_PER_ADAPTER * distinct and not entries.single:
        return None
    return f"more than {GATHER_MAX_ROWS_PER_ADAPTER} rows per adapter: the segmented loop is cheaper"


register(OP, [
    Kernel("compiled_bgmv", _compiled_bgmv, compile_machine_check, _bgmv_accepts),
    Kernel("gathered", _gathered, accepts=_few_rows_per_adapter),
    Kernel("segmented", _segmented),
    Kernel("reference", multi_lora_reference),
])


def multi_lora(out: torch.Tensor, x: torch.Tensor, tables: Tables, entries: Entries) -> torch.Tensor:
    """Add each entry's weighted low-rank update to out [rows, tokens, out] (in place) from x [rows, tokens, in]."""
    if entries.rows.numel() == 0:
        return out
    return call(OP, out, x, tables, entries)
