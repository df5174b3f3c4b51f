"""A run's metrics: metrics.jsonl (one line per logged step), TensorBoard scalars and the loss plot."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lorakit.train.run_dir import METRICS_NAME


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


class SilentLog:
    """MetricsLog's interface for the ranks that do not write the run folder (all but rank 0)."""

    def write(self, record: dict[str, Any]) -> None:
        """Nothing: rank 0 logs the same (all-reduced) records."""

    def records(self) -> list[dict[str, Any]]:
        """None kept."""
        return []

    def close(self) -> None:
        """Nothing to close."""


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
