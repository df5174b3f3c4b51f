"""The training loop, read top to bottom: data, model + adapter, optimizer, steps, checkpoints, results.

A run folder holds config.yaml, metrics.jsonl, TensorBoard events, checkpoint/ (adapter, optimizer,
scheduler, RNG, data position), and at the end adapter/ (PEFT format), loss.png and results.json.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from lorakit.allocator import retain_freed_memory
from lorakit.errors import LorakitError, TrainingInterrupted, TrainingStopped
from lorakit.files import write_text_atomic
from lorakit.fused import use_fused_kernels
from lorakit.inject import add_adapter, trainable_parameters
from lorakit.peft_format import save_adapter
from lorakit.train import data as data_mod
from lorakit.train.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lorakit.train.config import TrainConfig, resume_changes
from lorakit.train.loss import chunked_cross_entropy
from lorakit.train.run_dir import CONFIG_NAME, METRICS_NAME, RESULTS_NAME, RunFolder, check_run_dir
from lorakit.train.watch import DivergenceWatch, OverfitWatch


def lr_lambda(total_steps: int, warmup_steps: int, kind: str) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each step: linear warmup, then cosine/linear/constant."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool) -> torch.Tensor:
    """Mean next-token loss on labelled tokens; chunked over the vocabulary head when possible."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if chunked and isinstance(head, nn.Linear) and head.bias is None and isinstance(backbone, nn.Module):
        # use_cache=False: load_model leaves the KV cache on for generation; a training forward would
        # otherwise keep every layer's k and v alive until the loss.
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        hidden = out[0]
        return chunked_cross_entropy(hidden, head.weight.to(hidden.dtype), batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False).loss


class StopRequest:
    """Ctrl-C during training: the first one stops after the current step, a second one at once.

    Finishing the step keeps the checkpoint exact (no half-applied optimizer step), and a flag does not
    depend on a KeyboardInterrupt surviving whatever library code the signal lands in.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        """Put back the handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels after the causal shift that are not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], chunked: bool,
                         bf16: bool) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's loss (NaN/inf stops early).

    Each micro-batch's mean loss is weighted by its share of the step's labelled tokens, so the gradient
    equals that of one batch holding them all (a plain 1/accum weight would overweight short batches).
    """
    counts = [labelled_tokens(batch) for batch in micro_batches]
    total = sum(counts)
    step_loss = 0.0
    for batch, count in zip(micro_batches, counts):
        if count == 0:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = causal_lm_loss(model, batch, chunked)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        (loss * (count / total)).backward()
        step_loss += value * count / total
    return step_loss


def evaluate_loss(model: nn.Module, dataset: list, cfg: TrainConfig, pad_id: int) -> float:
    """Token-weighted mean loss over a dataset, no gradients."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        for batch in data_mod.batches(dataset, cfg.batch_size, seed=0, group_by_length=True, pad_id=pad_id):
            tokens = labelled_tokens(batch)
            if tokens:
                total += float(causal_lm_loss(model, batch, cfg.chunked_loss)) * tokens
                count += tokens
    model.train(was_training)
    return total / count if count else float("nan")


class MetricsLog:
    """metrics.jsonl (one line per logged step) plus optional TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool) -> None:
        self.path = run_dir / METRICS_NAME
        if self.path.exists():  # a resumed run rewrites the steps after its checkpoint
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: no event files (pip install tensorboard)",
                              stacklevel=2)
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and mirror its numbers to TensorBoard."""
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def records(self) -> list[dict[str, Any]]:
        """Everything logged so far."""
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Write the loss curve (train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def nonfinite_message(run_dir: Path, loss: float, step: int, learning_rate: float, kept: bool) -> str:
    """Why a run stopped on a NaN/inf loss and how to go on (the last checkpoint, if any, is untouched).

    `kept`: the run folder stays (it has completed steps); otherwise nothing of this run was kept.
    """
    checkpoint = find_checkpoint(run_dir) if kept else None
    if checkpoint is not None:
        where = (f"the last good checkpoint is kept in {checkpoint}; lower learning_rate (now {learning_rate}) "
                 "and --resume")
    elif kept:
        where = (f"no checkpoint was saved yet; lower learning_rate (now {learning_rate}) and start again "
                 "with --overwrite")
    else:
        where = f"nothing of this run was kept; lower learning_rate (now {learning_rate}) and start again"
    return f"loss is {loss} at step {step}: training stopped; {where}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def adapter_bytes(folder: Path) -> int:
    """Size on disk of an adapter folder."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def load_inputs(cfg: TrainConfig, model: nn.Module | None, tokenizer: Any) -> tuple[nn.Module, Any, list, list, dict]:
    """(model, tokenizer, train items, validation items, data stats); loads the model unless one is given."""
    train_examples = data_mod.load_examples(cfg.train_file)
    if cfg.val_file:
        data_mod.load_examples(cfg.val_file)  # a bad validation file fails before the model loads
    if model is None:
        from lorakit.models import load_model

        dtype = cfg.compute_dtype()
        model, tokenizer = load_model(cfg.model, quantize=cfg.quantize, dtype=dtype, compute_dtype=dtype,
                                      attn_implementation=cfg.attn_implementation)
    train_set, val_set, stats = data_mod.build_dataset(
        train_examples, tokenizer, max_seq_len=cfg.max_seq_len, packing=cfg.packing,
        val_file=cfg.val_file, val_fraction=cfg.val_fraction, seed=cfg.seed,
        train_on_prompt=cfg.train_on_prompt, source=cfg.train_file)
    return model, tokenizer, train_set, val_set, stats


def read_saved_config(run_dir: Path) -> dict[str, Any]:
    """The run folder's config.yaml as a dict."""
    try:
        data = yaml.safe_load((run_dir / CONFIG_NAME).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{run_dir / CONFIG_NAME}: unreadable ({exc.__class__.__name__}); "
                           "start again with --overwrite") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{run_dir / CONFIG_NAME}: not a mapping of settings; start again with --overwrite")
    return data


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant, as the DDP-safe path wants)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise LorakitError(f"gradient_checkpointing: {type(model).__name__} has no checkpointing switch; set "
                           "gradient_checkpointing: false")


def warn_line(text: str) -> None:
    """A one-line warning on stderr that leaves the progress bar intact (the CLI's `lorakit: warning:` form)."""
    tqdm.write(f"lorakit: warning: {text}", file=sys.stderr)


def describe_changes(changes: dict[str, list[Any]]) -> str:
    """'key old -> new, ...' for the settings a resume changed."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def config_yaml(cfg: TrainConfig, resumes: list[dict[str, Any]]) -> str:
    """config.yaml's text: the settings, headed by one comment line per resume that changed some."""
    history = "".join(f"# resumed at step {r['step']}: {describe_changes(r['changed'])}\n"
                      for r in resumes if r["changed"])
    return history + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def vocab_size(model: nn.Module) -> int | None:
    """The output vocabulary of a causal LM (None if it has no config saying so)."""
    return getattr(getattr(model, "config", None), "vocab_size", None)


def train(cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False, model: nn.Module | None = None,
          tokenizer: Any = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune a LoRA/QLoRA adapter as `cfg` says; returns the results dict (also in results.json).

    Nothing in output_dir changes until the model and data have loaded, and a run replaced with
    `overwrite` is kept aside until the new run completes its first step (restored if it fails first).
    """
    run_dir = Path(cfg.output_dir)
    if not cfg.train_file:
        raise LorakitError("train_file is not set: give a JSONL file (chat, Alpaca or text format)")
    folder_state = check_run_dir(run_dir, overwrite, resume)
    changes = resume_changes(read_saved_config(run_dir), cfg, str(run_dir / CONFIG_NAME)) if resume else {}
    model, tokenizer, train_set, val_set, data_stats = load_inputs(cfg, model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    folder = RunFolder(run_dir, folder_state, resume)
    folder.begin()
    try:
        return _run(cfg, folder, model, train_set, val_set, data_stats, pad_id, changes, progress)
    except BaseException:
        folder.abort()  # a no-op once the run has completed a step
        raise


def _run(cfg: TrainConfig, folder: RunFolder, model: nn.Module, train_set: list, val_set: list,
         data_stats: dict, pad_id: int, changes: dict, progress: bool) -> dict[str, Any]:
    run_dir = folder.run_dir
    checkpoint = find_checkpoint(run_dir) if not folder.fresh else None
    if checkpoint is None:
        torch.manual_seed(cfg.seed)
        add_adapter(model, cfg.lora_config(), name="default")
        state: dict[str, Any] = {"step": 0}
    else:
        state = load_checkpoint(checkpoint, model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    use_fused_kernels(model)
    retain_freed_memory()  # every step re-allocates the last one's activations: no page faults for them

    micro_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * micro_per_epoch
                                                    / cfg.gradient_accumulation_steps))
    from lorakit.optim import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.lr_scheduler))
    step = int(state["step"])
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The config's peak lr wins over the checkpoint's, so "lower learning_rate and --resume" works.
        scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = cfg.learning_rate * factor(scheduler.last_epoch)
        set_rng_state(state["rng"])
    resumes = list(state.get("resumes", []))
    if checkpoint is not None:
        resumes.append({"step": step, "changed": changes})
        if changes:
            tqdm.write(f"resumed at step {step}: {describe_changes(changes)}")
    write_text_atomic(run_dir / CONFIG_NAME, config_yaml(cfg, resumes))
    log = MetricsLog(run_dir, step, cfg.tensorboard)
    watch = OverfitWatch()
    divergence = DivergenceWatch(vocab_size(model), start=state.get("loss_start"))
    trainable, total = trainable_parameters(model)

    epoch_orders: dict[int, list[list[int]]] = {}
    lengths = [len(item["input_ids"]) for item in train_set]

    def micro_batch(index: int) -> dict[str, torch.Tensor]:
        # The data position is the micro-batch counter alone: resuming needs nothing else.
        epoch, position = divmod(index, micro_per_epoch)
        if epoch not in epoch_orders:
            epoch_orders.clear()
            epoch_orders[epoch] = data_mod.batch_order(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        return data_mod.collate([train_set[i] for i in epoch_orders[epoch][position]], pad_id)

    def extra() -> dict[str, Any]:
        return {"train_seconds": train_seconds, "last_loss": last_loss, "loss_start": divergence.start,
                "resumes": resumes}

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    started, train_seconds, tokens_seen = time.time(), float(state.get("train_seconds", 0.0)), 0
    last_loss = float(state.get("last_loss", float("nan")))
    val_loss = float("nan")
    # A periodic checkpoint is written one step late, once the next step's loss is finite: after a NaN
    # stop the kept checkpoint holds weights that still gave a finite loss, not the ones that blew up.
    save_due, step_rng = False, rng_state()
    stop = StopRequest()
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            step_rng = rng_state()
            if stop.requested:
                raise KeyboardInterrupt  # at a step boundary: the checkpoint is exactly `step` steps in
            batches = [micro_batch(step * cfg.gradient_accumulation_steps + micro)
                       for micro in range(cfg.gradient_accumulation_steps)]
            step_loss = accumulate_gradients(model, batches, cfg.chunked_loss, cfg.bf16)
            if not math.isfinite(step_loss):
                raise TrainingStopped(nonfinite_message(run_dir, step_loss, step + 1, cfg.learning_rate,
                                                        kept=not folder.fresh))
            if save_due:
                saving_since = time.perf_counter()
                save_checkpoint(run_dir, model, optimizer, scheduler, step, extra(), rng=step_rng)
                t0 += time.perf_counter() - saving_since  # the step's speed leaves the write out
                save_due = False
            step_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            folder.commit()  # the new run trains: the run it replaces (if any) can go
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            tokens_seen += step_tokens
            last_loss = step_loss
            record: dict[str, Any] = {"step": step, "loss": round(step_loss, 6),
                                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(step_tokens / elapsed, 1)}
            diverged = divergence.update(step, step_loss)
            if diverged:
                record["warning"] = "diverged"
                if divergence.diverged_at == step:
                    warn_line(diverged)
            if val_set and (step % cfg.eval_every == 0 or step == total_steps):
                val_loss = evaluate_loss(model, val_set, cfg, pad_id)
                record["val_loss"] = round(val_loss, 6)
                warning = watch.update(step_loss, val_loss)
                if warning:
                    record["warning"] = "overfitting" if not diverged else "diverged, overfitting"
                    warn_line(warning)
            if step % cfg.log_every == 0 or "val_loss" in record or "warning" in record or step == total_steps:
                log.write(record)
            postfix = {"loss": f"{step_loss:.4f}", "lr": f"{record['lr']:.2e}",
                       "tok_s": f"{record['tokens_per_s']:.0f}"}
            if divergence.diverged_at is not None:
                postfix["DIVERGED"] = f"step {divergence.diverged_at}"
            bar.set_postfix(postfix)
            bar.update(1)
            save_due = step % cfg.save_every == 0 and step < total_steps
    except KeyboardInterrupt:
        bar.close()
        log.close()
        if folder.fresh:
            raise TrainingInterrupted(f"interrupted before the first step completed: nothing was written to "
                                      f"{run_dir}") from None
        # step_rng: an interrupted step may already have drawn dropout masks; resume redoes it from its start.
        save_checkpoint(run_dir, model, optimizer, scheduler, step, extra(), rng=step_rng)
        raise TrainingInterrupted(f"interrupted at step {step}: checkpoint saved in {run_dir / 'checkpoint'}; "
                                  "continue with --resume") from None
    finally:
        stop.restore()
    bar.close()
    log.close()

    adapter_dir = save_adapter(model, run_dir / "adapter", name="default")
    records = log.records()
    plot_losses(records, run_dir / "loss.png")
    results = {
        "steps": step, "final_loss": last_loss, "val_loss": None if math.isnan(val_loss) else val_loss,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.time() - started, 2),
        "tokens_per_s": round(tokens_seen / train_seconds, 1) if train_seconds and tokens_seen else None,
        "trainable_params": trainable, "total_params": total, "adapter_bytes": adapter_bytes(adapter_dir),
        "adapter_dir": str(adapter_dir), "data": data_stats, "diverged_at_step": divergence.diverged_at,
        "resumes": resumes,
    }
    # The final checkpoint stays, so a finished run can be extended (raise max_steps, --resume).
    save_checkpoint(run_dir, model, optimizer, scheduler, step, extra())
    _write_json(run_dir / RESULTS_NAME, results)
    return results
