"""Training as several processes through torchrun (gloo on the CPU): real launches of `lorakit train --nproc N`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import build_tiny_model_folder, tiny_train_config
from safetensors.torch import load_file

from lorakit.train.config import TrainConfig
from lorakit.train.demo_task import make_examples, write_jsonl
from lorakit.train.distributed import Dist

pytestmark = pytest.mark.slow  # each test launches several Python processes that load torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    return {"model": build_tiny_model_folder(root / "model"), "root": root,
            "train": write_jsonl(make_examples(48, seed=3), root / "train.jsonl")}


def _config(tiny, name: str, **overrides) -> str:
    defaults = dict(max_steps=4, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant", learning_rate=1e-3)
    settings = tiny_train_config(tiny["model"], tiny["train"], tiny["root"] / name, **{**defaults, **overrides})
    path = tiny["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def _train(config: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lorakit", "train", config, "--quiet", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, filter(None, lines))}


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_two_processes_train_what_one_process_trains(tiny, quantize):
    """DDP over 2 processes, same global batch: per-step losses within 1e-5, the saved adapters within 1e-6."""
    one = _train(_config(tiny, f"one-{quantize}", quantize=quantize))
    two = _train(_config(tiny, f"two-{quantize}", quantize=quantize), "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert two.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    reference, split = _losses(tiny["root"] / f"one-{quantize}"), _losses(tiny["root"] / f"two-{quantize}")
    assert list(split) == [1, 2, 3, 4] and reference[4] < reference[1]  # it trains
    for step, loss in reference.items():
        assert split[step] == pytest.approx(loss, abs=1e-5), step
    ours, theirs = _adapter(tiny["root"] / f"one-{quantize}"), _adapter(tiny["root"] / f"two-{quantize}")
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, atol=1e-6, rtol=0)
    config = yaml.safe_load((tiny["root"] / f"two-{quantize}" / "config.yaml").read_text())
    assert config["distributed"] == "ddp"


def test_a_killed_rank_stops_every_process_and_resume_continues_with_another_count(tiny):
    """SIGKILL one of 2 ranks: all exit non-zero with one line; resuming with 1 process reproduces the losses."""
    reference_config = _config(tiny, "ref8", max_steps=8, gradient_accumulation_steps=4, save_every=2)
    assert _train(reference_config).returncode == 0
    reference = _losses(tiny["root"] / "ref8")

    killed_config = _config(tiny, "killed", max_steps=2000, gradient_accumulation_steps=4, save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "lorakit", "train", killed_config, "--quiet", "--nproc", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = tiny["root"] / "killed" / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), launcher.communicate(timeout=60)
    workers = subprocess.run(["pgrep", "-f", f"lorakit train {killed_config}"], capture_output=True,
                             text=True).stdout.split()
    victim = max(int(pid) for pid in workers if int(pid) != launcher.pid)
    os.kill(victim, signal.SIGKILL)
    started = time.time()
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 3 and time.time() - started < 60
    errors = [line for line in err.splitlines() if line.startswith("lorakit: error:")]
    assert len(errors) == 1 and "failed first (signal SIGKILL)" in errors[0], err[-3000:]
    assert "Traceback" not in err

    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] % 2 == 0 and 2 <= state["step"] < 8, state["step"]  # an intact, even-step checkpoint
    resumed = _train(killed_config, "--resume", "--set", "max_steps=8")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = _losses(tiny["root"] / "killed")
    for step in range(state["step"] + 1, 9):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step


def test_share_splits_a_micro_batch_in_rank_order():
    """Rank r of w takes the r-th contiguous part: the ranks' parts put together are the one-process batch."""
    batch = [7, 3, 9, 1, 4, 8]
    parts = [Dist(rank=r, world=3, kind="ddp").share(batch) for r in range(3)]
    assert parts == [[7, 3], [9, 1], [4, 8]]
    assert Dist().share(batch) == batch


def test_bad_distributed_settings_are_refused(tiny):
    with pytest.raises(Exception, match="distributed must be one of"):
        TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tiny["root"] / "x", distributed="mpi"))
    with pytest.raises(Exception, match="adalora"):
        TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tiny["root"] / "x", distributed="ddp",
                                        adapter="adalora"))
    result = _train(_config(tiny, "odd", batch_size=3), "--nproc", "2")
    assert result.returncode != 0
    assert "batch_size 3 does not split over 2 processes" in result.stderr


def test_two_nodes_of_one_process_through_the_c10d_rendezvous(tiny):
    """The README's multi-node recipe on localhost: 2 torchrun "nodes" x 1 process train what 1 process trains."""
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous endpoint
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _config(tiny, "nodes", distributed="ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "nodes",
                               "-m", "lorakit", "train", config, "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(out.count("done: 4 steps") for out, _ in outputs) == 1
    one = _train(_config(tiny, "nodes-one"))
    assert one.returncode == 0
    reference = _losses(tiny["root"] / "nodes-one")
    for step, loss in _losses(tiny["root"] / "nodes").items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
