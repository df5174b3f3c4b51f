"""The run folder's life: what state a folder is in, what --resume / --overwrite may do with it, and an
atomic replacement that keeps the previous run until the new one has proved it trains.

A folder is in exactly one state (`run_state`); every message about it comes from that one reading, so
two commands can never describe the same folder in contradictory ways.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.files import check_writable
from lorakit.train.checkpoint import find_checkpoint

CONFIG_NAME = "config.yaml"
RESULTS_NAME = "results.json"
METRICS_NAME = "metrics.jsonl"

MISSING, EMPTY, FOREIGN, UNSTARTED, UNFINISHED, FINISHED = (
    "missing", "empty", "foreign", "unstarted", "unfinished", "finished")


def run_state(run_dir: Path) -> str:
    """missing | empty | foreign (not a run) | unstarted (no checkpoint) | unfinished | finished."""
    if not run_dir.exists():
        return MISSING
    if not run_dir.is_dir():
        raise LorakitError(f"output_dir {run_dir} is a file, not a folder; choose another path")
    if not any(run_dir.iterdir()):
        return EMPTY
    if not (run_dir / CONFIG_NAME).is_file():
        return FOREIGN
    if (run_dir / RESULTS_NAME).is_file():
        return FINISHED
    return UNFINISHED if find_checkpoint(run_dir) is not None else UNSTARTED


def last_logged_step(run_dir: Path) -> int:
    """The highest step in the folder's metrics.jsonl (0 if none is readable)."""
    path = run_dir / METRICS_NAME
    step = 0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except (ValueError, TypeError, AttributeError):
                continue
    return step


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> str:
    """Raise unless the flags fit the folder's state (and the folder can be written); returns the state."""
    if overwrite and resume:
        raise LorakitError("--resume and --overwrite contradict each other: --resume continues the run in "
                           "output_dir, --overwrite replaces it; pass one")
    state = run_state(run_dir)
    check_writable(run_dir, "output_dir")
    if resume:
        reasons = {
            MISSING: "the folder does not exist",
            EMPTY: "the folder is empty",
            FOREIGN: "it is not a lorakit run folder (no config.yaml)",
            UNSTARTED: f"the run stopped before its first checkpoint (last logged step "
                       f"{last_logged_step(run_dir)})",
        }
        if state in reasons:
            fix = {UNSTARTED: "start it again with --overwrite", FOREIGN: "choose another output_dir"}.get(
                state, "drop --resume to start a new run")
            raise LorakitError(f"{run_dir}: nothing to resume: {reasons[state]}; {fix}")
        return state
    if state in (MISSING, EMPTY):
        return state
    if state == FOREIGN:
        raise LorakitError(f"{run_dir} is not empty and is not a lorakit run folder; choose another output_dir")
    if overwrite:
        check_writable(run_dir.parent, "output_dir's parent")  # the replaced run is moved aside by a rename there
        return state
    advice = {
        FINISHED: "a finished run; pass --overwrite to replace it, --resume with a higher max_steps to extend it",
        UNFINISHED: "an unfinished run; --resume it, or pass --overwrite to start again",
        UNSTARTED: "a run that stopped before its first checkpoint; pass --overwrite to start it again",
    }
    raise LorakitError(f"{run_dir} holds {advice[state]}, or choose another output_dir")


class RunFolder:
    """Creates the run folder for a new run, keeping a replaced run aside until `commit()`.

    `begin()` moves a run being overwritten to a hidden sibling (one rename) and creates the folder;
    `commit()` deletes the old run once the new one has completed a step; `abort()` removes the new
    folder and puts the old run back. A folder that only resumes is left alone by all three.
    """

    def __init__(self, run_dir: Path, state: str, resume: bool, writes: bool = True) -> None:
        self.run_dir = run_dir
        self.writes = writes  # False on every rank of a distributed run but rank 0: it only reads the folder
        self.fresh = not resume
        self.replacing = self.fresh and state not in (MISSING, EMPTY)
        self.existed = state != MISSING
        self.backup: Path | None = None

    def begin(self) -> None:
        """Move a replaced run aside and create the folder (a resumed run's folder is used as it is)."""
        if not self.writes:
            return
        if self.replacing:
            self.backup = Path(tempfile.mkdtemp(dir=self.run_dir.parent, prefix=f".{self.run_dir.name}-replaced-"))
            os.replace(self.run_dir, self.backup / "run")
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        """The new run works: drop the run it replaced."""
        if self.backup is not None:
            shutil.rmtree(self.backup, ignore_errors=True)
            self.backup = None
        self.fresh = False

    def abort(self) -> None:
        """The new run failed before its first step: remove what it wrote and restore the run it replaced."""
        if not self.fresh or not self.writes:
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.existed and self.backup is None:
            self.run_dir.mkdir()  # it was an empty folder the user made
        if self.backup is not None:
            os.replace(self.backup / "run", self.run_dir)
            shutil.rmtree(self.backup, ignore_errors=True)
            self.backup = None
