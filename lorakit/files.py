"""Writing files the safe way: check a destination before the work starts, write by rename when it ends."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing parent."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def check_writable(path: Path, what: str) -> None:
    """Raise unless the folder `path` (or, if it does not exist yet, its nearest existing parent) takes new files.

    `what` names the setting in the message (e.g. "output_dir", "--out").
    """
    probe = nearest_existing(path)
    if not probe.is_dir():
        where = "is a file, not a folder" if probe == path else f"cannot be created: {probe} is a file"
        raise LorakitError(f"{what} {path} {where}; choose another path")
    try:  # a real write, not os.access: root passes access checks on read-only folders and file systems
        handle, name = tempfile.mkstemp(dir=probe, prefix=".lorakit-write-test-")
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise LorakitError(f"{what} {path}: cannot write in {probe} ({exc.strerror}); choose a folder you can "
                           "write to") from None


def check_new_file(path: Path, what: str, suffix: str | None = None) -> None:
    """Raise unless a file can be written at `path`: the folder exists and is writable, the path is no folder."""
    if path.is_dir():
        raise LorakitError(f"{what} {path} is a folder; give a file name")
    if suffix and path.suffix.lower() != suffix:
        raise LorakitError(f"{what} {path}: expected a {suffix} file name")
    if not path.parent.is_dir():
        raise LorakitError(f"{what} {path}: the folder {path.parent} does not exist; create it first")
    check_writable(path.parent, what)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file by rename, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
