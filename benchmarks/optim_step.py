"""Optimizer step time on the demo's adapter: lorakit AdamW8bit vs bitsandbytes' AdamW8bit vs torch AdamW.

    python benchmarks/optim_step.py                  # SmolLM2-135M-Instruct NF4, r=16 all-linear (420 tensors)
    python benchmarks/optim_step.py --steps 40 --json optim_step.json
    python benchmarks/optim_step.py --tiny           # random-init tiny Llama (CI smoke test)

The adapter is the one `lorakit demo` trains (`demo_config`'s LoRA: r=16, alpha 32, all linear layers).
Each row is one optimizer over its own copy of the adapter's parameters; every round draws one set of
gradients (normal, std 1e-3, about a clipped real step's) that every row steps with, rows in a rotating
order, so a machine that drifts over seconds moves each row alike. "step ms" is a row's median;
"vs bnb" is bitsandbytes' AdamW8bit's median over the row's, "paired" the median over rounds of the
same ratio within a round. "state B/param" counts the state tensors' bytes (a tensor several parameters
share, as bitsandbytes' code maps, once; step counters not).
"one tensor at a time" is lorakit's AdamW8bit with buckets of one tensor, to show what the buckets buy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from train_step import lorakit_model

import lorakit as lk
from lorakit.optim import AdamW8bit
from lorakit.train.demo import demo_config

BASELINE = "bitsandbytes AdamW8bit"
GRAD_STD = 1e-3
WARMUP_STEPS = 2
Make = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def optimizers(lr: float, min_8bit_size: int) -> dict[str, Make]:
    """Row name -> builder, with the demo's lr and no weight decay (as the demo trains)."""
    import bitsandbytes as bnb

    return {
        "lorakit AdamW8bit": lambda ps: AdamW8bit(ps, lr=lr, weight_decay=0.0, min_8bit_size=min_8bit_size),
        "lorakit AdamW8bit, one tensor at a time": lambda ps: AdamW8bit(ps, lr=lr, weight_decay=0.0,
                                                                          min_8bit_size=min_8bit_size,
                                                                          bucket_elements=1),
        BASELINE: lambda ps: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=0.0, min_8bit_size=min_8bit_size),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, fused=True),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, foreach=True),
    }


def adapter_shapes(tiny: bool, lora_config: lk.LoraConfig) -> tuple[list[torch.Size], str]:
    """Shapes of the trainable tensors of this adapter on the NF4 base, and the model's label."""
    model = lorakit_model(tiny, torch.float32, "nf4")
    lk.add_adapter(model, lora_config, name="default")
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    label = "tiny random-init Llama" if tiny else "SmolLM2-135M-Instruct NF4"
    return shapes, f"{label}, LoRA r={lora_config.r} all-linear"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors but step counters, a tensor shared by several states once."""
    unique = {value.data_ptr(): value.numel() * value.element_size() for state in optimizer.state.values()
              for key, value in state.items() if torch.is_tensor(value) and key != "step"}
    return sum(unique.values())


@torch.no_grad()
def timed_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> float:
    """Seconds of one optimizer.step() with these gradients."""
    for param, grad in zip(params, grads):
        param.grad = grad
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def run(shapes: list[torch.Size], steps: int, lr: float, min_8bit_size: int) -> dict[str, dict]:
    """Every row stepped WARMUP_STEPS times, then timed over `steps` interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    rows = {}
    for name, make in optimizers(lr, min_8bit_size).items():
        params = [nn.Parameter(tensor.clone()) for tensor in initial]
        rows[name] = {"params": params, "optimizer": make(params), "seconds": []}
    names = list(rows)
    for round_index in range(-WARMUP_STEPS, steps):
        grads = [torch.randn(shape, generator=generator) * GRAD_STD for shape in shapes]
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed_step(rows[name]["params"], rows[name]["optimizer"], grads)
            if round_index >= 0:
                rows[name]["seconds"].append(seconds)
        if round_index >= 0 and (round_index + 1) % 10 == 0:
            print(f"round {round_index + 1}/{steps} done", flush=True)
    n_params = sum(shape.numel() for shape in shapes)
    base = rows[BASELINE]["seconds"]
    return {name: {"seconds": row["seconds"], "median_ms": 1e3 * statistics.median(row["seconds"]),
                   "vs_baseline": statistics.median(base) / statistics.median(row["seconds"]),
                   "paired": statistics.median(b / s for b, s in zip(base, row["seconds"])),
                   "state_bytes_per_param": state_bytes(row["optimizer"]) / n_params}
            for name, row in rows.items()}


def format_table(results: dict) -> str:
    """One line per row: median step, ratios to bitsandbytes, state bytes per parameter."""
    lines = [f"\nOptimizer step, {results['model']}: {results['tensors']} tensors, {results['params']:,} parameters; "
             f"min_8bit_size {results['min_8bit_size']}; median of {results['steps']} rounds; {results['machine']}",
             f"{'optimizer':<40} {'step ms':>8} {'vs bnb':>7} {'paired':>7} {'state B/param':>13}"]
    lines.append("-" * len(lines[-1]))
    for name, row in results["rows"].items():
        lines.append(f"{name:<40} {row['median_ms']:8.1f} {row['vs_baseline']:6.2f}x {row['paired']:6.2f}x "
                     f"{row['state_bytes_per_param']:13.3f}")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama, 3 rounds (smoke test)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed rounds (default 20; tiny 3)")
    parser.add_argument("--min-8bit-size", type=positive_int, default=None,
                        help="tensors smaller than this keep fp32 states (default 4096 as both libraries; tiny "
                             "256, so its small adapter tensors take the 8-bit path)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    steps = args.steps or (3 if args.tiny else 20)
    min_8bit_size = args.min_8bit_size or (256 if args.tiny else 4096)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # demo_config wants a folder; nothing is written there
        cfg = demo_config(Path(tmp), 1, 1)
    shapes, label = adapter_shapes(args.tiny, cfg.lora_config())
    lr = cfg.learning_rate
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    results = {"model": label, "tensors": len(shapes), "params": sum(s.numel() for s in shapes), "steps": steps,
               "min_8bit_size": min_8bit_size, "machine": machine, "rows": run(shapes, steps, lr, min_8bit_size)}
    print(format_table(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
