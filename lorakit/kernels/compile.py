"""torch.compile with a fallback: a kernel that fails to compile runs eagerly, with one warning.

LORAKIT_COMPILE=0 switches every compiled kernel off (the dispatch then picks the next one).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch


@functools.cache
def _compiler_missing() -> str | None:
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "no C++ compiler for torch.compile (install g++)"
    return None


def compile_machine_check() -> str | None:
    """Why compiled CPU kernels cannot run in this process (None when they can)."""
    if os.environ.get("LORAKIT_COMPILE", "1") == "0":
        return "LORAKIT_COMPILE=0"
    return _compiler_missing()


def dispatch_mode_check() -> str | None:
    """Compiled code cannot run under a Python dispatch mode (PeakMemoryTracker is one)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return None if _get_current_dispatch_mode() is None else "a Python dispatch mode is tracing ops"


def raise_recompile_limit(limit: int = 64) -> None:
    """Lift dynamo's per-function recompile limit: a model has a handful of shapes, each compiled once."""
    import torch._dynamo

    current = getattr(torch._dynamo.config, "recompile_limit", None)
    if current is not None and current < limit:
        torch._dynamo.config.recompile_limit = limit


class Compiled:
    """`fn` compiled on first call; if compiling or running the compiled code fails, `fn` from then on."""

    def __init__(self, fn: Callable[..., Any], dynamic: bool) -> None:
        self.fn = fn
        self.dynamic = dynamic
        self.failure: str | None = None
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.failure is not None:
            return self.fn(*args)
        try:
            if self._compiled is None:
                raise_recompile_limit()
                self._compiled = torch.compile(self.fn, dynamic=self.dynamic, fullgraph=True)
            return self._compiled(*args)
        except Exception as exc:  # no compiler, an unsupported platform...: the eager function always works
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"lorakit: compiling {self.fn.__name__} failed ({self.failure[:200]}); running it "
                          "eagerly (same results, slower)", RuntimeWarning, stacklevel=2)
            return self.fn(*args)


def compiled(fn: Callable[..., Any], dynamic: bool = True) -> Compiled:
    """Wrap `fn` for compile-on-first-use with the eager fallback."""
    return Compiled(fn, dynamic)
