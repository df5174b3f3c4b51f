"""When lorakit uses torch.compile: CPU hot loops that eager PyTorch runs as several memory passes.

Set LORAKIT_COMPILE=0 to run the plain-PyTorch references everywhere (no C++ compiler needed).
A compile failure (no compiler, an unsupported platform) switches compiling off for the process
and the caller falls back to its reference.
"""

from __future__ import annotations

import os

_DISABLED: list[bool] = [os.environ.get("LORAKIT_COMPILE", "1") == "0"]


def compile_enabled() -> bool:
    """False when LORAKIT_COMPILE=0, an earlier compile failed, or a dispatch mode is tracing ops now."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    # Compiled code cannot run under a Python dispatch mode (lorakit's PeakMemoryTracker is one):
    # the references run there instead, with the same results.
    return not _DISABLED[0] and _get_current_dispatch_mode() is None


def disable_compile() -> None:
    """Stop compiling for the rest of the process (after a failure)."""
    _DISABLED[0] = True


def raise_recompile_limit(limit: int = 64) -> None:
    """Lift dynamo's per-function recompile limit: a model has a handful of shapes, each compiled once."""
    import torch._dynamo

    current = getattr(torch._dynamo.config, "recompile_limit", None)
    if current is not None and current < limit:
        torch._dynamo.config.recompile_limit = limit
