"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.peft_format import load_adapter, save_adapter

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout, data order)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs saved by rng_state()."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer_state: dict[str, Any], scheduler: Any,
                    step: int, extra: dict[str, Any], rng: dict[str, Any] | None = None) -> Path:
    """Write run_dir/checkpoint atomically: a temp folder is filled, then swapped in by rename.

    `optimizer_state` is the optimizer's state dict with whole tensors (gathered first when sharded).
    `rng` is the RNG state as of the end of `step` (default: now), for a caller that saves a step late.
    """
    final = run_dir / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint-tmp-"))
    try:
        save_adapter(model, tmp / "adapter", name="default")
        state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "step": step,
                 "rng": rng if rng is not None else rng_state(), **extra}
        torch.save(state, tmp / STATE_NAME)
        old = run_dir / ".checkpoint-old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (also one left mid-swap by a crash)."""
    for name in (CHECKPOINT_DIR, ".checkpoint-old"):
        folder = run_dir / name
        if (folder / STATE_NAME).is_file() and (folder / "adapter").is_dir():
            return folder
    return None


def load_checkpoint(folder: Path, model: nn.Module) -> dict[str, Any]:
    """Load the adapter into `model` (trainable) and return the trainer state (never unpickles objects)."""
    try:
        state = torch.load(folder / STATE_NAME, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise LorakitError(f"{folder / STATE_NAME}: cannot read the checkpoint ({exc}); "
                           "start again with --overwrite") from None
    load_adapter(model, folder / "adapter", name="default", is_trainable=True)
    return state
