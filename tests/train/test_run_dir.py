"""The run folder's states and the --resume / --overwrite rules: one reading per folder, no contradictions."""

import json
import os

import pytest

from lorakit.errors import LorakitError
from lorakit.train.checkpoint import CHECKPOINT_DIR, STATE_NAME
from lorakit.train.run_dir import (
    EMPTY,
    FINISHED,
    FOREIGN,
    MISSING,
    UNFINISHED,
    UNSTARTED,
    RunFolder,
    check_run_dir,
    run_state,
)


def make_folder(root, state):
    """A folder in `state`, built from the files each state is read from."""
    run = root / state
    if state == MISSING:
        return run
    run.mkdir()
    if state == FOREIGN:
        (run / "cat.jpg").write_bytes(b"\xff\xd8")
    if state in (UNSTARTED, UNFINISHED, FINISHED):
        (run / "config.yaml").write_text("max_steps: 5\n")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    if state in (UNFINISHED, FINISHED):
        (run / CHECKPOINT_DIR / "adapter").mkdir(parents=True)
        (run / CHECKPOINT_DIR / STATE_NAME).write_bytes(b"x")
    if state == FINISHED:
        (run / "results.json").write_text("{}")
    return run


STATES = (MISSING, EMPTY, FOREIGN, UNSTARTED, UNFINISHED, FINISHED)


@pytest.mark.parametrize("state", STATES)
def test_each_folder_reads_as_its_state(tmp_path, state):
    assert run_state(make_folder(tmp_path, state)) == state


def outcome(run, overwrite, resume):
    try:
        check_run_dir(run, overwrite=overwrite, resume=resume)
        return None
    except LorakitError as exc:
        return str(exc)


@pytest.mark.parametrize("state", STATES)
def test_advice_never_contradicts_what_the_advised_flag_does(tmp_path, state):
    """Whatever a refusal recommends (--resume, --overwrite, dropping --resume) is then accepted."""
    run = make_folder(tmp_path, state)
    plain, resumed, replaced = outcome(run, False, False), outcome(run, False, True), outcome(run, True, False)
    for message in (plain, resumed):
        if message is None:
            continue
        if "--resume it" in message or "--resume with" in message:
            assert resumed is None, (message, resumed)
        if "--overwrite" in message:
            assert replaced is None, (message, replaced)
        if "drop --resume" in message:
            assert plain is None, (message, plain)
    expected = {  # (no flag, --resume, --overwrite) accepted?
        MISSING: (True, False, True), EMPTY: (True, False, True), FOREIGN: (False, False, False),
        UNSTARTED: (False, False, True), UNFINISHED: (False, True, True), FINISHED: (False, True, True),
    }[state]
    assert (plain is None, resumed is None, replaced is None) == expected


def test_messages_name_the_state_and_the_last_step(tmp_path):
    run = make_folder(tmp_path, UNSTARTED)
    assert "stopped before its first checkpoint (last logged step 1)" in outcome(run, False, True)
    assert "stopped before its first checkpoint; pass --overwrite" in outcome(run, False, False)
    assert "the folder does not exist; drop --resume" in outcome(make_folder(tmp_path, MISSING), False, True)
    assert "not a lorakit run folder" in outcome(make_folder(tmp_path, FOREIGN), True, False)
    assert "contradict" in outcome(tmp_path, True, True)


def test_output_dir_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in outcome(tmp_path / "file", False, False)
    assert "cannot be created: " in outcome(tmp_path / "file" / "run", False, False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; tests/test_cli_fuzz.py "
                    "covers it as an unprivileged user")
def test_read_only_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert "cannot write in" in outcome(locked / "run", False, False)


def test_replacing_keeps_the_old_run_until_commit(tmp_path):
    run = make_folder(tmp_path, FINISHED)
    folder = RunFolder(run, FINISHED, resume=False)
    folder.begin()
    assert list(run.iterdir()) == [] and (folder.backup / "run" / "results.json").is_file()
    (run / "config.yaml").write_text("new\n")
    folder.abort()  # the new run failed before its first step: the old one is back, byte for byte
    assert (run / "config.yaml").read_text() == "max_steps: 5\n" and (run / "results.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    folder = RunFolder(run, FINISHED, resume=False)
    folder.begin()
    (run / "config.yaml").write_text("new\n")
    folder.commit()
    folder.abort()  # after a completed step a failure keeps the new run
    assert (run / "config.yaml").read_text() == "new\n" and not (run / "results.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_new_run_leaves_an_empty_folder_as_it_found_it(tmp_path):
    for state in (MISSING, EMPTY):
        run = make_folder(tmp_path, state)
        folder = RunFolder(run, state, resume=False)
        folder.begin()
        (run / "config.yaml").write_text("x")
        folder.abort()
        assert run.exists() == (state == EMPTY) and (not run.exists() or not any(run.iterdir()))


def test_a_resumed_run_is_never_removed(tmp_path):
    run = make_folder(tmp_path, UNFINISHED)
    folder = RunFolder(run, UNFINISHED, resume=True)
    folder.begin()
    folder.abort()
    assert (run / "config.yaml").is_file() and (run / CHECKPOINT_DIR / STATE_NAME).is_file()
