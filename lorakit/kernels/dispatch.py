"""The dispatch table: each operation's implementations in order of preference, and which one runs.

An implementation applies when two checks pass: `machine()` (can it run in this process at all: a
device, a compiler, an optional package) and `accepts(*args)` (does it handle these inputs: device,
dtype, shape). Each check returns None when it passes, else the reason it does not; the last
implementation of every operation is its plain-PyTorch reference, which always applies.
LORAKIT_KERNELS=reference forces every reference (for debugging, and for tests that want them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Check = Callable[..., "str | None"]


def always(*args: Any, **kwargs: Any) -> None:
    """A check that always passes."""
    return None


@dataclass(frozen=True)
class Kernel:
    """One implementation of an operation and the conditions under which it applies."""

    name: str
    fn: Callable[..., Any]
    machine: Callable[[], str | None] = always
    accepts: Check = always
    note: str = field(default="", compare=False)


TABLE: dict[str, list[Kernel]] = {}


def register(op: str, kernels: list[Kernel]) -> None:
    """Set the ordered implementations of `op`; the last one is the reference."""
    TABLE[op] = list(kernels)


def forced_reference() -> bool:
    """True when LORAKIT_KERNELS=reference asks for the plain-PyTorch references."""
    return os.environ.get("LORAKIT_KERNELS", "").strip().lower() == "reference"


def reference(op: str) -> Kernel:
    """The plain-PyTorch reference of `op`."""
    return TABLE[op][-1]


def why_not(kernel: Kernel, op: str, *args: Any) -> str | None:
    """Why `kernel` does not run for these inputs (None when it does apply)."""
    if forced_reference() and kernel is not reference(op):
        return "LORAKIT_KERNELS=reference"
    return kernel.accepts(*args) or kernel.machine()


def select(op: str, *args: Any) -> Kernel:
    """The first implementation of `op` that applies to these inputs."""
    kernels = TABLE[op]
    if forced_reference():
        return kernels[-1]
    for kernel in kernels[:-1]:
        if kernel.accepts(*args) is None and kernel.machine() is None:  # inputs first: a machine check may build
            return kernel
    return kernels[-1]


def call(op: str, *args: Any) -> Any:
    """Run `op` with the implementation `select` picks."""
    return select(op, *args).fn(*args)
