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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from lorakit.adalora_budget import orthogonal_regularization, update_and_allocate
from lorakit.errors import LorakitError, PeerStopped, TrainingInterrupted, TrainingStopped
from lorakit.fast_training import chunked_lm_loss, enable_fast_training
from lorakit.files import write_text_atomic
from lorakit.inject import add_adapter, trainable_parameters
from lorakit.peft_format import save_adapter
from lorakit.train import data as data_mod
from lorakit.train.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lorakit.train.config import TrainConfig, resume_changes
from lorakit.train.distributed import (
    Dist,
    full_state,
    no_sync,
    peer_stopped,
    shard_optimizer_state,
    start,
    stop,
    stop_together,
    wrap,
)
from lorakit.train.metrics import MetricsLog, SilentLog, plot_losses
from lorakit.train.run_dir import CONFIG_NAME, RESULTS_NAME, RunFolder, check_run_dir
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
    # use_cache=False: load_model leaves the KV cache on for generation; a training forward would
    # otherwise keep every layer's k and v alive until the loss.
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    sharded = getattr(model, "sharded_chunked_loss", None)  # FSDP's gathering form (train/distributed.py)
    result = (sharded or partial(chunked_lm_loss, model))(batch["labels"], **inputs) if chunked else None
    return result[0] if result is not None else model(**inputs, labels=batch["labels"]).loss


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
                         bf16: bool, regulariser: Callable[[], torch.Tensor] | None = None,
                         dist: Dist | None = None) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's loss (NaN/inf stops early).

    Each micro-batch's mean loss is weighted by its share of the step's labelled tokens, so the gradient
    equals that of one batch holding them all (a plain 1/accum weight would overweight short batches).
    A `regulariser` (AdaLoRA's orthogonality term) joins each micro-batch's loss, weighted alike, so the
    step counts it once; the returned loss is the task loss alone.
    Over several processes (`dist`), the micro-batches are this rank's shares and the weights are shares of
    every rank's labelled tokens, times the world size that DDP's gradient average divides by.
    """
    dist = dist or Dist()
    counts = [labelled_tokens(batch) for batch in micro_batches]
    total = dist.sum(float(sum(counts)))
    step_loss = 0.0
    for index, (batch, count) in enumerate(zip(micro_batches, counts)):
        if count == 0 and not dist.active:
            continue
        with no_sync(model, last=index == len(micro_batches) - 1):
            with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = causal_lm_loss(model, batch, chunked)
            if not count:  # a rank whose share has no labelled token still joins DDP's all-reduce, adding 0
                loss = torch.nan_to_num(loss, nan=0.0) * 0.0
            value = float(loss.detach())
            if not math.isfinite(value):
                return value
            if regulariser is not None:
                loss = loss + regulariser()
            (loss * (count / total * dist.world)).backward()
        step_loss += value * count / total
    return dist.sum(step_loss)



def evaluate_loss(model: nn.Module, dataset: list, cfg: TrainConfig, pad_id: int,
                  device: torch.device | None = None) -> float:
    """Token-weighted mean loss over a dataset, no gradients."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = device or next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for batch in data_mod.batches(dataset, cfg.batch_size, seed=0, group_by_length=True, pad_id=pad_id):
            batch = {key: value.to(device) for key, value in batch.items()}
            tokens = labelled_tokens(batch)
            if tokens:
                total += float(causal_lm_loss(model, batch, cfg.chunked_loss)) * tokens
                count += tokens
    model.train(was_training)
    return total / count if count else float("nan")


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
        # auto picks lorakit's attention only with the fast kernels; without them, transformers' sdpa
        attention = "sdpa" if cfg.attn_implementation == "auto" and not cfg.fast_kernels else cfg.attn_implementation
        model, tokenizer = load_model(cfg.model, quantize=cfg.quantize, dtype=dtype, compute_dtype=dtype,
                                      attn_implementation=attention)
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
    if resume and cfg.adapter == "adalora":
        raise LorakitError("--resume is not available for adapter: adalora (the rank budget's sensitivity "
                           "scores are not checkpointed); start again with --overwrite")
    dist = start(cfg.distributed, cfg.batch_size, cfg.distributed_timeout)
    try:
        with stop_together(dist, "loading the model and data"):
            device = dist.device(cfg.torch_device())
            folder_state = check_run_dir(run_dir, overwrite, resume)
            changes = resume_changes(read_saved_config(run_dir), cfg, str(run_dir / CONFIG_NAME)) if resume else {}
            model, tokenizer, train_set, val_set, data_stats = load_inputs(cfg, model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        folder = RunFolder(run_dir, folder_state, resume, writes=dist.main)
        folder.begin()
        try:
            # FSDP moves each layer to the device as it shards it: the whole model is never there at once.
            sharded = dist.active and cfg.distributed == "fsdp"
            run = setup(cfg, folder, model if sharded else model.to(device), train_set, val_set, data_stats, pad_id,
                        changes, dist, device)
            run_steps(run, progress and dist.main)
            return finish(run)
        except BaseException as exc:
            folder.abort()  # a no-op once the run has completed a step
            if dist.active and peer_stopped(exc):
                raise PeerStopped(f"process {dist.rank} of {dist.world} stopped: another process of the run "
                                  f"failed or stopped answering ({str(exc).splitlines()[0][:120]})") from None
            raise
    finally:
        stop(dist)


@dataclass
class Run:
    """One training run in progress: what setup built and what the steps update."""

    cfg: TrainConfig
    folder: RunFolder
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_set: list
    val_set: list
    data_stats: dict
    pad_id: int
    step: int
    total_steps: int
    resumes: list
    log: MetricsLog
    divergence: DivergenceWatch
    watch: OverfitWatch = field(default_factory=OverfitWatch)
    train_seconds: float = 0.0
    tokens_seen: int = 0
    last_loss: float = float("nan")
    val_loss: float = float("nan")
    started: float = field(default_factory=time.time)
    # A periodic checkpoint is written one step late, once the next step's loss is finite: after a NaN
    # stop the kept checkpoint holds weights that still gave a finite loss, not the ones that blew up.
    save_due: bool = False
    step_rng: dict = field(default_factory=rng_state)
    epoch_orders: dict = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)
    engine: nn.Module | None = None  # what the steps run: the model, or its DDP wrapper (FSDP shards the model)
    compute_device: torch.device | None = None  # set when parameters may live elsewhere (FSDP's CPU offload)

    @property
    def device(self) -> torch.device:
        """Where the batches go: the training device, else the device of the trainable parameters."""
        if self.compute_device is not None:
            return self.compute_device
        return next(p for p in self.model.parameters() if p.requires_grad).device

    @property
    def micro_per_epoch(self) -> int:
        """Micro-batches in one pass over the training set."""
        return math.ceil(len(self.train_set) / self.cfg.batch_size)

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """The index-th micro-batch; the data position is this counter alone, so resuming needs nothing else."""
        epoch, position = divmod(index, self.micro_per_epoch)
        if epoch not in self.epoch_orders:
            self.epoch_orders.clear()
            lengths = [len(item["input_ids"]) for item in self.train_set]
            self.epoch_orders[epoch] = data_mod.batch_order(lengths, self.cfg.batch_size, seed=self.cfg.seed + epoch)
        share = self.dist.share(self.epoch_orders[epoch][position])
        batch = data_mod.collate([self.train_set[i] for i in share], self.pad_id)
        return {key: value.to(self.device) for key, value in batch.items()}

    def extra(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights and the optimizer."""
        return {"train_seconds": self.train_seconds, "last_loss": self.last_loss, "loss_start": self.divergence.start,
                "resumes": self.resumes}

    def checkpoint(self, rng: dict | None = None) -> None:
        """Save the checkpoint of the steps taken so far (every rank calls: sharded state is gathered; rank 0
        writes)."""
        with full_state(self.model, self.optimizer, self.dist) as optimizer_state:
            self.save(optimizer_state, rng)

    def save(self, optimizer_state: dict[str, Any], rng: dict | None = None) -> None:
        """Rank 0 writes the checkpoint, given the optimizer state with whole tensors."""
        if self.dist.main:
            save_checkpoint(self.folder.run_dir, self.model, optimizer_state, self.scheduler, self.step,
                            self.extra(), rng=rng)


def prepare_model(cfg: TrainConfig, folder: RunFolder, model: nn.Module, total_steps: int) -> dict[str, Any]:
    """A fresh adapter or the checkpoint's, checkpointing and fast paths on; returns the checkpoint's state."""
    checkpoint = find_checkpoint(folder.run_dir) if not folder.fresh else None
    if checkpoint is None:
        torch.manual_seed(cfg.seed)
        add_adapter(model, cfg.adapter_config(total_steps), name="default")
        state: dict[str, Any] = {"step": 0}
    else:
        state = load_checkpoint(checkpoint, model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    if cfg.fast_kernels:  # the loss is the chunked_loss key's (causal_lm_loss), attention the attn key's
        enable_fast_training(model, attention=cfg.attn_implementation == "auto", loss=False)
    state["resumed"] = checkpoint is not None
    return state


def make_schedule(cfg: TrainConfig, model: nn.Module, total_steps: int,
                  state: dict[str, Any]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and learning-rate schedule, restored from the checkpoint's state when resuming.

    `model` is already wrapped: FSDP replaces the parameters the optimizer must hold by sharded ones.
    """
    from lorakit.optim import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.lr_scheduler))
    if state["resumed"]:
        optimizer.load_state_dict(state["optimizer"])
        shard_optimizer_state(optimizer)  # checkpoints hold whole tensors; a sharded parameter wants its shard
        scheduler.load_state_dict(state["scheduler"])
        # The config's peak lr wins over the checkpoint's, so "lower learning_rate and --resume" works.
        scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = cfg.learning_rate * factor(scheduler.last_epoch)
        set_rng_state(state["rng"])
    return optimizer, scheduler


def setup(cfg: TrainConfig, folder: RunFolder, model: nn.Module, train_set: list, val_set: list, data_stats: dict,
          pad_id: int, changes: dict, dist: Dist | None = None, device: torch.device | None = None) -> Run:
    """Adapter, optimizer, schedule and logs of a new or resumed run; writes config.yaml."""
    dist = dist or Dist()
    micro_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * micro_per_epoch
                                                    / cfg.gradient_accumulation_steps))
    state = prepare_model(cfg, folder, model, total_steps)
    engine = wrap(model, dist, device=device, cpu_offload=cfg.fsdp_cpu_offload)
    optimizer, scheduler = make_schedule(cfg, model, total_steps, state)
    step = int(state["step"])
    resumes = list(state.get("resumes", []))
    if state["resumed"]:
        resumes.append({"step": step, "changed": changes})
        if changes and dist.main:
            tqdm.write(f"resumed at step {step}: {describe_changes(changes)}")
    log = MetricsLog(folder.run_dir, step, cfg.tensorboard) if dist.main else SilentLog()
    if dist.main:
        write_text_atomic(folder.run_dir / CONFIG_NAME, config_yaml(cfg, resumes))
    run = Run(cfg, folder, model, optimizer, scheduler, train_set, val_set, data_stats, pad_id, step, total_steps,
              resumes, log, DivergenceWatch(vocab_size(model), start=state.get("loss_start")), dist=dist,
              engine=engine, compute_device=device)
    run.train_seconds = float(state.get("train_seconds", 0.0))
    run.last_loss = float(state.get("last_loss", float("nan")))
    return run


def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step (its micro-batches, clipping, the delayed checkpoint); returns its metrics record."""
    cfg, t0 = run.cfg, time.perf_counter()
    batches = [run.micro_batch(run.step * cfg.gradient_accumulation_steps + micro)
               for micro in range(cfg.gradient_accumulation_steps)]
    adalora = cfg.adapter == "adalora"
    step_loss = accumulate_gradients(run.engine or run.model, batches, cfg.chunked_loss, cfg.bf16,
                                     partial(orthogonal_regularization, run.model) if adalora else None, run.dist)
    if not math.isfinite(step_loss):
        raise TrainingStopped(nonfinite_message(run.folder.run_dir, step_loss, run.step + 1, cfg.learning_rate,
                                                kept=not run.folder.fresh))
    if run.save_due:
        saving_since = time.perf_counter()
        run.checkpoint(rng=run.step_rng)
        t0 += time.perf_counter() - saving_since  # the step's speed leaves the write out
        run.save_due = False
    step_tokens = int(run.dist.sum(sum(int(batch["attention_mask"].sum()) for batch in batches)))
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for group in run.optimizer.param_groups for p in group["params"]],
                                       cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    if adalora:  # the budget schedule reads this step's gradients (PEFT's update_and_allocate, 0-based step)
        update_and_allocate(run.model, run.step)
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.folder.commit()  # the new run trains: the run it replaces (if any) can go
    elapsed = time.perf_counter() - t0
    run.train_seconds += elapsed
    run.tokens_seen += step_tokens
    run.last_loss = step_loss
    return {"step": run.step, "loss": round(step_loss, 6), "lr": run.scheduler.get_last_lr()[0],
            "tokens_per_s": round(step_tokens / elapsed, 1)}


def watch_step(run: Run, record: dict[str, Any]) -> None:
    """Divergence and overfitting checks (validating when due); warnings go into the record and on stderr."""
    diverged = run.divergence.update(run.step, run.last_loss)
    if diverged:
        record["warning"] = "diverged"
        if run.divergence.diverged_at == run.step and run.dist.main:
            warn_line(diverged)
    if run.val_set and (run.step % run.cfg.eval_every == 0 or run.step == run.total_steps):
        run.val_loss = evaluate_loss(run.model, run.val_set, run.cfg, run.pad_id, run.device)
        record["val_loss"] = round(run.val_loss, 6)
        warning = run.watch.update(run.last_loss, run.val_loss)
        if warning:
            record["warning"] = "overfitting" if not diverged else "diverged, overfitting"
            if run.dist.main:
                warn_line(warning)


def run_steps(run: Run, progress: bool) -> None:
    """Step until total_steps with a progress bar; Ctrl-C stops at a step boundary with a checkpoint."""
    cfg = run.cfg
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    stop = StopRequest()
    try:
        while run.step < run.total_steps:
            run.step_rng = rng_state()
            if stop.requested:
                raise KeyboardInterrupt  # at a step boundary: the checkpoint is exactly `step` steps in
            record = train_step(run)
            watch_step(run, record)
            if (run.step % cfg.log_every == 0 or "val_loss" in record or "warning" in record
                    or run.step == run.total_steps):
                run.log.write(record)
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                       "tok_s": f"{record['tokens_per_s']:.0f}"}
            if run.divergence.diverged_at is not None:
                postfix["DIVERGED"] = f"step {run.divergence.diverged_at}"
            bar.set_postfix(postfix)
            bar.update(1)
            run.save_due = run.step % cfg.save_every == 0 and run.step < run.total_steps
    except KeyboardInterrupt:
        bar.close()
        run.log.close()
        if run.folder.fresh:
            raise TrainingInterrupted(f"interrupted before the first step completed: nothing was written to "
                                      f"{run.folder.run_dir}") from None
        # step_rng: an interrupted step may already have drawn dropout masks; resume redoes it from its start.
        run.checkpoint(rng=run.step_rng)
        raise TrainingInterrupted(f"interrupted at step {run.step}: checkpoint saved in "
                                  f"{run.folder.run_dir / 'checkpoint'}; continue with --resume") from None
    finally:
        stop.restore()
    bar.close()
    run.log.close()


def finish(run: Run) -> dict[str, Any]:
    """Save the adapter, plot the loss, keep the final checkpoint and write results.json; returns the results.

    Rank 0 writes; the other ranks return once it has, with the same results.
    """
    run_dir = run.folder.run_dir
    with stop_together(run.dist, "saving the adapter"):
        with full_state(run.model, run.optimizer, run.dist) as optimizer_state:
            if run.dist.main:
                results = _finish_main(run, run_dir, optimizer_state)
    if not run.dist.main:
        results = json.loads((run_dir / RESULTS_NAME).read_text())
    return results


def _finish_main(run: Run, run_dir: Path, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    adapter_dir = save_adapter(run.model, run_dir / "adapter", name="default")
    plot_losses(run.log.records(), run_dir / "loss.png")
    trainable, total = trainable_parameters(run.model)
    results = {
        "steps": run.step, "final_loss": run.last_loss, "val_loss": None if math.isnan(run.val_loss) else run.val_loss,
        "train_seconds": round(run.train_seconds, 2), "wall_seconds": round(time.time() - run.started, 2),
        "tokens_per_s": (round(run.tokens_seen / run.train_seconds, 1) if run.train_seconds and run.tokens_seen
                         else None),
        "trainable_params": trainable, "total_params": total, "adapter_bytes": adapter_bytes(adapter_dir),
        "adapter_dir": str(adapter_dir), "data": run.data_stats, "diverged_at_step": run.divergence.diverged_at,
        "resumes": run.resumes,
    }
    # The final checkpoint stays, so a finished run can be extended (raise max_steps, --resume).
    run.save(optimizer_state)
    _write_json(run_dir / RESULTS_NAME, results)
    return results
