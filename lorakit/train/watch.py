"""Signals a run gives while it trains: overfitting (validation) and divergence (training loss)."""

from __future__ import annotations

import math


class OverfitWatch:
    """Warns when validation loss rises twice in a row while the training loss keeps falling."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float]] = []

    def update(self, train_loss: float, val_loss: float) -> str | None:
        """Record an evaluation; return a warning message when overfitting shows."""
        self.history.append((train_loss, val_loss))
        if len(self.history) < 3:
            return None
        (t0, v0), (t1, v1), (t2, v2) = self.history[-3:]
        if v2 > v1 > v0 and t2 < t0:
            return (f"validation loss rose {v0:.4f} -> {v2:.4f} while training loss fell {t0:.4f} -> {t2:.4f}: "
                    "the adapter is overfitting; stop earlier, lower the lr or add data")
        return None


class DivergenceWatch:
    """Flags a run whose loss has left the trained regime for `patience` consecutive steps.

    Two signs, each counted from the run's first logged loss `start`:
    - far above its start: loss > max(RISE_FACTOR * start, start + RISE_MARGIN) (the optimizer is
      stepping out of the basin: lr too high, bad data mix);
    - pinned at the uniform distribution: |loss - ln(vocab)| < PIN_TOLERANCE * ln(vocab) when the run
      started clearly below it (a pretrained model that now predicts nothing: the logits collapsed).
    A randomly initialised model starts at ln(vocab) itself, so only the first sign applies to it.
    """

    RISE_FACTOR = 1.5
    RISE_MARGIN = 1.0
    PIN_TOLERANCE = 0.02
    PIN_START_BELOW = 0.9  # start < 0.9 ln(vocab): the model had learned something to lose

    def __init__(self, vocab_size: int | None, patience: int = 3, start: float | None = None) -> None:
        self.uniform = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
        self.patience = patience
        self.start = start
        self.streak = 0
        self.diverged_at: int | None = None

    def reason(self, loss: float) -> str | None:
        """Why this loss looks diverged (None when it does not)."""
        if self.start is None:
            return None
        if (self.uniform is not None and self.start < self.PIN_START_BELOW * self.uniform
                and abs(loss - self.uniform) < self.PIN_TOLERANCE * self.uniform):
            return (f"loss {loss:.4f} is pinned at ln(vocab) = {self.uniform:.4f}, a uniform guess over the "
                    f"vocabulary (the run started at {self.start:.4f})")
        if loss > max(self.RISE_FACTOR * self.start, self.start + self.RISE_MARGIN):
            return f"loss {loss:.4f} is far above the run's start ({self.start:.4f})"
        return None

    def update(self, step: int, loss: float) -> str | None:
        """Record a step's loss; return a message at each step of a divergence `patience` steps long."""
        if self.start is None:
            self.start = loss
            return None
        why = self.reason(loss)
        self.streak = self.streak + 1 if why else 0
        if self.streak < self.patience:
            return None
        if self.diverged_at is None:
            self.diverged_at = step
        return (f"the run has diverged since step {step - self.streak + 1} ({why} for {self.streak} steps); "
                "the adapter will not be usable: lower learning_rate and start again with --overwrite")
