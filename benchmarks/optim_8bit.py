"""AdamW8bit vs fp32 AdamW on the demo's QLoRA run: per-step update error (lorakit and bitsandbytes), loss curves.

    nice python benchmarks/optim_8bit.py                 # SmolLM2-135M-Instruct NF4, demo task, 4 runs x 40 steps
    python benchmarks/optim_8bit.py --steps 60 --json optim.json --plot runs/optim_8bit.png
    python benchmarks/optim_8bit.py --tiny               # random-init tiny Llama, 3 steps (CI smoke test)

Every run trains as `lorakit demo` does (`demo_config`: NF4 base, r=16 alpha 32 all-linear, lr 1e-3 cosine
with 5% warmup, weight decay 0, max_seq_len 96, grad-norm clip 1.0, bf16 autocast, chunked loss), one step per
batch, with the trainer's own `accumulate_gradients`, `lr_lambda` and `batch_order`.

Update error: the fp32 run (torch AdamW as `make_optimizer("adamw")` builds it) feeds each step's clipped
gradients and lr to two shadows, lorakit's AdamW8bit and bitsandbytes' AdamW8bit, whose parameters are first
reset to the fp32 run's: u = parameter after - before, error = ||u8 - u32|| / ||u32|| over all adapter tensors
together. The shadows' 8-bit states carry on from step to step as in a real run; their parameters do not
drift, so the error is one step's, not a trajectory's. Step 1 has no quantized history, so its error is ~0.

Loss curves: independent runs from the same start: fp32 AdamW (the run above), AdamW8bit (same adapter init,
same batches), and as the noise scale two fp32 runs that change one thing: the adapter's init seed, or the
data order's seed. Curves are compared raw and smoothed (trailing mean over --smooth steps).
"""

from __future__ import annotations

import argparse
import json
import math
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
from lorakit.inject import adapter_configs
from lorakit.optim import AdamW8bit, make_optimizer
from lorakit.train import data as data_mod
from lorakit.train import demo_task
from lorakit.train.demo import demo_config
from lorakit.train.trainer import accumulate_gradients, lr_lambda

N_TRAIN = 2000  # the demo's training set
TINY_SEQ = 32
RUNS = {  # name: (optimizer, adapter init seed, data order seed)
    "fp32 AdamW": ("adamw", 0, 0),
    "lorakit AdamW8bit": ("adamw8bit", 0, 0),
    "fp32 AdamW, init seed 1": ("adamw", 1, 0),
    "fp32 AdamW, data seed 1": ("adamw", 0, 1),
}
REFERENCE = "fp32 AdamW"
BatchFn = Callable[[int, int], dict[str, torch.Tensor]]


def demo_batches(tokenizer, batch_size: int, max_seq_len: int) -> BatchFn:
    """batch(step, data_seed) over the demo's training set, in the trainer's epoch order for that seed."""
    train_examples, _ = demo_task.make_splits(N_TRAIN, 100, seed=0)
    train_set, _, _ = data_mod.build_dataset(train_examples, tokenizer, max_seq_len=max_seq_len)
    lengths = [len(item["input_ids"]) for item in train_set]
    per_epoch = math.ceil(len(train_set) / batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch(step: int, data_seed: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(step, per_epoch)
        order = data_mod.batch_order(lengths, batch_size, seed=data_seed + epoch)
        return data_mod.collate([train_set[i] for i in order[position]], pad_id)
    return batch


def random_batches(vocab: int, batch_size: int, seq: int) -> BatchFn:
    """batch(step, data_seed) of random tokens, labels = inputs (tiny smoke test only)."""
    def batch(step: int, data_seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1_000_003 * data_seed + step)
        ids = torch.randint(0, vocab, (batch_size, seq), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return batch


def fresh_adapter(model: nn.Module, lora_config: lk.LoraConfig, init_seed: int) -> list[tuple[str, nn.Parameter]]:
    """Replace the adapter by a new one drawn with init_seed (as the trainer seeds it); its named parameters."""
    if "default" in adapter_configs(model):
        lk.delete_adapter(model, "default")
    torch.manual_seed(init_seed)
    lk.add_adapter(model, lora_config, name="default")
    model.train()
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Shadow:
    """An optimizer stepping copies of the run's parameters from the run's point, with the run's gradients."""

    def __init__(self, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], params: list[nn.Parameter]):
        self.params = [nn.Parameter(p.detach().clone()) for p in params]
        self.optimizer = make(self.params)

    @torch.no_grad()
    def updates(self, before: list[torch.Tensor], grads: list[torch.Tensor | None], lr: float) -> list[torch.Tensor]:
        """Step from `before` with `grads` at `lr`; the update of each parameter."""
        for param, start, grad in zip(self.params, before, grads):
            param.copy_(start)
            param.grad = None if grad is None else grad.clone()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return [param.detach() - start for param, start in zip(self.params, before)]


def update_error(updates: list[torch.Tensor], reference: list[torch.Tensor],
                 names: list[str]) -> tuple[float, float, str]:
    """(||u - ref|| / ||ref|| over all tensors, the worst tensor's own ratio, its name); zero-update tensors skipped."""
    diff_sq = sum(float((u.double() - r.double()).pow(2).sum()) for u, r in zip(updates, reference))
    ref_sq = sum(float(r.double().pow(2).sum()) for r in reference)
    worst, worst_name = 0.0, ""
    for u, r, name in zip(updates, reference, names):
        norm = float(r.double().norm())
        if norm > 0:  # lora_A's first update is exactly 0 (its gradient is 0 while lora_B is 0)
            ratio = float((u.double() - r.double()).norm()) / norm
            if ratio > worst:
                worst, worst_name = ratio, name
    return math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else 0.0, worst, worst_name


def clipped_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                      batch: BatchFn, data_seed: int, step: int, factor: Callable[[int], float], cfg,
                      ) -> tuple[float, float]:
    """Set the step's lr and compute its clipped gradients as the trainer does; (loss, lr)."""
    lr = cfg.learning_rate * factor(step)  # what the trainer's LambdaLR sets before this step
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = accumulate_gradients(model, [batch(step, data_seed)], cfg.chunked_loss, cfg.bf16)
    if not math.isfinite(loss):
        raise SystemExit(f"loss is {loss} at step {step + 1}")
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    return loss, lr


def train_run(model: nn.Module, named_params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
              batch: BatchFn, data_seed: int, steps: int, cfg, shadows: dict[str, Shadow] | None = None,
              ) -> tuple[list[float], list[float], dict[str, list]]:
    """Train `steps` steps as the trainer does; returns (losses, lrs, shadow errors per step by name)."""
    params = [p for _, p in named_params]
    names = [name for name, _ in named_params]
    factor = lr_lambda(steps, math.ceil(cfg.warmup_ratio * steps), cfg.lr_scheduler)
    losses, lrs, errors = [], [], {name: [] for name in shadows or {}}
    for step in range(steps):
        loss, lr = clipped_gradients(model, optimizer, params, batch, data_seed, step, factor, cfg)
        before = [p.detach().clone() for p in params]
        optimizer.step()
        if shadows:
            reference = [p.detach() - start for p, start in zip(params, before)]
            grads = [p.grad for p in params]
            for name, shadow in shadows.items():
                errors[name].append(update_error(shadow.updates(before, grads, lr), reference, names))
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        lrs.append(lr)
        if (step + 1) % 10 == 0:
            print(f"  step {step + 1}/{steps}: loss {loss:.4f}", flush=True)
    return losses, lrs, errors


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def error_summary(per_step: list[tuple[float, float, str]]) -> dict:
    """Median/mean/best/worst of the all-tensor error after step 1, and the worst single tensor over all steps."""
    totals = [total for total, _, _ in per_step]
    later = totals[1:] or totals
    tensor_step = max(range(len(per_step)), key=lambda i: per_step[i][1])
    return {"per_step": totals, "worst_tensor_per_step": [worst for _, worst, _ in per_step],
            "step1": totals[0], "median_after_step1": statistics.median(later),
            "mean_after_step1": statistics.fmean(later), "best_after_step1": min(later),
            "worst_after_step1": max(later),
            "worst_step": 2 + later.index(max(later)) if len(totals) > 1 else 1,
            "worst_tensor": {"name": per_step[tensor_step][2], "step": tensor_step + 1,
                             "error": per_step[tensor_step][1]}}


def curve_summary(losses: list[float], reference: list[float], window: int) -> dict:
    """Final and last-10 loss, and differences to the reference curve (raw and smoothed)."""
    ours, ref = smoothed(losses, window), smoothed(reference, window)
    return {"losses": losses, "final": losses[-1], "mean_last10": statistics.fmean(losses[-10:]),
            "max_abs_diff_smoothed": max(abs(a - b) for a, b in zip(ours, ref)),
            "max_rel_diff_smoothed": max(abs(a - b) / b for a, b in zip(ours, ref)),
            "mean_abs_diff_raw": statistics.fmean(abs(a - b) for a, b in zip(losses, reference))}


def plot(results: dict, path: Path) -> None:
    """Loss curves (left) and per-step update error vs fp32 AdamW (right) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in results["loss_curves"].items():
        steps = range(1, len(curve["losses"]) + 1)
        line, = left.plot(steps, curve["losses"], alpha=0.3, linewidth=0.8)
        left.plot(steps, smoothed(curve["losses"], results["smooth"]), color=line.get_color(), label=name)
    left.set(xlabel="step", ylabel=f"train loss (thin: raw, thick: mean of {results['smooth']})", yscale="log")
    left.set_title("Loss curves")
    for name, summary in results["update_error"].items():
        steps = range(2, len(summary["per_step"]) + 1)  # step 1 is ~0: left off the log scale
        line, = right.plot(steps, summary["per_step"][1:], label=f"{name}: all adapter tensors")
        right.plot(steps, summary["worst_tensor_per_step"][1:], ":", color=line.get_color(),
                   label=f"{name}: worst tensor")
    right.axhline(1e-2, color="gray", linestyle="--", linewidth=0.8, label="1e-2")
    right.set(xlabel="step", ylabel="||u8 - u32|| / ||u32||", yscale="log")
    right.set_title("Update error vs fp32 AdamW, same gradients")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(args: argparse.Namespace) -> tuple[nn.Module, BatchFn, str]:
    """The NF4 model and its batches: the demo's (SmolLM2 + date task) or the tiny stand-in's."""
    if args.tiny:
        model = lorakit_model(True, torch.float32, "nf4")
        vocab = model.get_input_embeddings().num_embeddings
        return model, random_batches(vocab, args.batch, TINY_SEQ), "tiny random-init Llama, random tokens"
    model, tokenizer = lk.load_model("smollm2-135m-instruct", quantize="nf4")  # as `lorakit demo` loads it
    return model, demo_batches(tokenizer, args.batch, args.cfg.max_seq_len), "SmolLM2-135M-Instruct NF4, demo task"


def make_8bit(kind: str, min_8bit_size: int, cfg) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """A builder of lorakit's or bitsandbytes' AdamW8bit with the run's hyperparameters."""
    if kind == "lorakit":
        return lambda ps: AdamW8bit(ps, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                    min_8bit_size=min_8bit_size)
    import bitsandbytes as bnb

    return lambda ps: bnb.optim.AdamW8bit(ps, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                          min_8bit_size=min_8bit_size)


def run(args: argparse.Namespace) -> dict:
    """All runs; the results dict (also the --json file)."""
    cfg = args.cfg
    model, batch, label = load(args)
    print(f"model: {label}; {args.steps} steps of batch {args.batch}; min_8bit_size {args.min_8bit_size}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
          flush=True)
    try:
        import bitsandbytes  # noqa: F401

        shadow_kinds = {"lorakit AdamW8bit": "lorakit", "bitsandbytes AdamW8bit": "bitsandbytes"}
    except ImportError:
        print("bitsandbytes is not installed: its column is left out")
        shadow_kinds = {"lorakit AdamW8bit": "lorakit"}
    results: dict = {"model": label, "steps": args.steps, "batch": args.batch, "smooth": args.smooth,
                     "min_8bit_size": args.min_8bit_size, "lr": cfg.learning_rate, "update_error": {},
                     "loss_curves": {}}
    curves = {}
    for name, (optimizer_name, init_seed, data_seed) in RUNS.items():
        start = time.perf_counter()
        named_params = fresh_adapter(model, cfg.lora_config(), init_seed)
        params = [p for _, p in named_params]
        if optimizer_name == "adamw8bit":  # make_optimizer("adamw8bit") with min_8bit_size as asked
            optimizer = make_8bit("lorakit", args.min_8bit_size, cfg)(params)
        else:
            optimizer = make_optimizer(optimizer_name, params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        shadows = None
        if name == REFERENCE:
            shadows = {shadow: Shadow(make_8bit(kind, args.min_8bit_size, cfg), params)
                       for shadow, kind in shadow_kinds.items()}
        curves[name], lrs, errors = train_run(model, named_params, optimizer, batch, data_seed, args.steps, cfg,
                                              shadows)
        if shadows:
            results["lr_per_step"] = lrs
            results["update_error"] = {shadow: error_summary(per_step) for shadow, per_step in errors.items()}
        print(f"{name}: final loss {curves[name][-1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    results["loss_curves"] = {name: curve_summary(losses, curves[REFERENCE], args.smooth)
                              for name, losses in curves.items()}
    return results


def format_tables(results: dict) -> str:
    """The update-error table and the loss-curve table."""
    steps = results["steps"]
    lines = [f"\nUpdate error ||u8 - u32|| / ||u32|| vs fp32 AdamW on the same gradients, all adapter tensors "
             f"together (steps 2..{steps}; worst tensor: over all steps)",
             f"{'optimizer':<24} {'step 1':>8} {'median':>9} {'mean':>9} {'worst':>9} {'@step':>5}  "
             f"{'worst tensor':>12} {'@step':>5}  name"]
    lines.append("-" * len(lines[-1]))
    for name, s in results["update_error"].items():
        lines.append(f"{name:<24} {s['step1']:8.1e} {s['median_after_step1']:9.2e} {s['mean_after_step1']:9.2e} "
                     f"{s['worst_after_step1']:9.2e} {s['worst_step']:5d}  {s['worst_tensor']['error']:12.2e} "
                     f"{s['worst_tensor']['step']:5d}  {s['worst_tensor']['name']}")
    lines += [f"\nLoss curves, {steps} steps; smoothed = trailing mean of {results['smooth']} steps; "
              f"differences are to '{REFERENCE}'",
              f"{'run':<24} {'final':>8} {'last-10 mean':>12} {'max|d| smoothed':>15} {'max rel':>8} "
              f"{'mean|d| raw':>11}"]
    lines.append("-" * len(lines[-1]))
    for name, c in results["loss_curves"].items():
        lines.append(f"{name:<24} {c['final']:8.4f} {c['mean_last10']:12.4f} {c['max_abs_diff_smoothed']:15.4f} "
                     f"{c['max_rel_diff_smoothed']:8.1%} {c['mean_abs_diff_raw']:11.4f}")
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, plot_default: str, plot_help: str) -> None:
    """The options this script and optim_8bit_encodings.py share."""
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama, 3 steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 40; tiny 3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; tiny 4)")
    parser.add_argument("--min-8bit-size", type=int, default=None,
                        help="tensors smaller than this keep fp32 states (default 4096 as both libraries; tiny "
                             "256, so its small adapter tensors take the 8-bit path)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--plot", default=plot_default, help=plot_help)


def finish_run_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the size defaults (real or tiny) and the demo's training config."""
    args.steps = args.steps or (3 if args.tiny else 40)
    args.batch = args.batch or (4 if args.tiny else 8)
    args.min_8bit_size = args.min_8bit_size or (256 if args.tiny else 4096)
    with tempfile.TemporaryDirectory() as tmp:  # demo_config wants a folder; nothing is written there
        args.cfg = demo_config(Path(tmp), args.steps, args.batch)
    return args


def report(results: dict, table: str, plot_fn: Callable[[dict, Path], None], args: argparse.Namespace,
           started: float) -> None:
    """Print the table, write the plot (and the JSON when asked), say where and how long."""
    print(table)
    plot_fn(results, Path(args.plot))
    print(f"\nplot: {args.plot}; total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "runs/optim_8bit.png", "PNG of the loss curves and update errors")
    parser.add_argument("--smooth", type=int, default=5, help="trailing-mean window of the smoothed loss curves")
    args = finish_run_arguments(parser.parse_args())
    started = time.perf_counter()
    results = run(args)
    report(results, format_tables(results), plot, args, started)


if __name__ == "__main__":
    main()
