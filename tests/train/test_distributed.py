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
            "untied": build_tiny_model_folder(root / "untied", tie=False),
            "train": write_jsonl(make_examples(48, seed=3), root / "train.jsonl")}


def _config(tiny, name: str, untied: bool = False, **overrides) -> str:
    defaults = dict(max_steps=4, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant", learning_rate=1e-3)
    model = tiny["untied" if untied else "model"]
    settings = tiny_train_config(model, tiny["train"], tiny["root"] / name, **{**defaults, **overrides})
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


REFERENCES: dict = {}  # the one-process runs, shared by the DDP and FSDP cases with the same settings

# (kind, quantize, settings, adapter tolerance). LoRA and QLoRA: the 1e-6. DoRA's magnitudes and
# factors come out 1.1e-6 apart after 4 AdamW steps (its gradients sum in another order over the ranks, and
# Adam divides by their root mean square), so its adapter is held to 1e-5; its losses to the same 1e-5.
CASES = [("ddp", None, {}, 1e-6), ("ddp", "nf4", {}, 1e-6), ("fsdp", None, {}, 1e-6),
         ("fsdp", "nf4", {"gradient_accumulation_steps": 2, "gradient_checkpointing": True}, 1e-6),
         ("fsdp", "nf4", {"lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_dora": True}},
          1e-5),
         ("fsdp", "nf4", {"untied": True}, 1e-6),  # the head and embedding as FSDP groups of their own
         ("ddp", None, {"adapter": "adalora", "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2,
                                                          "deltaT": 1, "lora_alpha": 8,
                                                          "target_modules": "all-linear"}}, 1e-6)]


def _one_process(tiny, quantize, extra) -> str:
    name = f"one-{quantize}-{len(REFERENCES)}"
    key = (quantize, repr(sorted(extra.items())))
    if key not in REFERENCES:
        result = _train(_config(tiny, name, quantize=quantize, **extra))
        assert result.returncode == 0, result.stderr[-2000:]
        REFERENCES[key] = name
    return REFERENCES[key]


@pytest.mark.parametrize("kind,quantize,extra,tolerance", CASES, ids=["ddp", "ddp-nf4", "fsdp", "fsdp-nf4-accum-ckpt",
                                                                       "fsdp-nf4-dora", "fsdp-nf4-untied",
                                                                       "ddp-adalora"])
def test_two_processes_train_what_one_process_trains(tiny, kind, quantize, extra, tolerance):
    """2 processes, same global batch: per-step losses within 1e-5, the saved adapters within 1e-6 (DoRA 1e-5)."""
    one = _one_process(tiny, quantize, extra)
    name = f"two-{kind}-{quantize}-" + "-".join(sorted(extra))
    two = _train(_config(tiny, name, quantize=quantize, distributed=kind, **extra), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    reference, split = _losses(tiny["root"] / one), _losses(tiny["root"] / name)
    assert list(split) == [1, 2, 3, 4] and reference[4] < reference[1]  # it trains
    for step, loss in reference.items():
        assert split[step] == pytest.approx(loss, abs=1e-5), step
    ours, theirs = _adapter(tiny["root"] / one), _adapter(tiny["root"] / name)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, atol=tolerance, rtol=0)
    config = yaml.safe_load((tiny["root"] / name / "config.yaml").read_text())
    assert config["distributed"] == kind
    if "adalora" in extra:  # every rank prunes the same ranks: the budget reads the all-reduced gradients
        saved = [json.loads((tiny["root"] / run / "adapter" / "adapter_config.json").read_text())
                 for run in (one, name)]
        assert saved[0]["rank_pattern"] == saved[1]["rank_pattern"]
        assert sum(map(sum, saved[1]["rank_pattern"].values())) == 2 * 14


@pytest.mark.parametrize("kind,resume_with", [("ddp", 1), ("fsdp", 2)])
def test_a_killed_rank_stops_every_process_and_resume_continues(tiny, kind, resume_with):
    """SIGKILL one of 2 ranks: all exit non-zero with one line; resuming (with 1 or 2 processes) reproduces the
    losses of the uninterrupted run."""
    if "ref8" not in REFERENCES:
        assert _train(_config(tiny, "ref8", max_steps=8, gradient_accumulation_steps=4, save_every=2)).returncode == 0
        REFERENCES["ref8"] = "ref8"
    reference = _losses(tiny["root"] / "ref8")

    name = f"killed-{kind}"
    killed_config = _config(tiny, name, max_steps=2000, gradient_accumulation_steps=4, save_every=2, distributed=kind,
                            fsdp_cpu_offload=kind == "fsdp")  # FSDP2's CPUOffloadPolicy too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "lorakit", "train", killed_config, "--quiet", "--nproc", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = tiny["root"] / name / "checkpoint" / "trainer_state.pt"
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
    resumed = _train(killed_config, "--resume", "--set", "max_steps=8", "--nproc", str(resume_with))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = _losses(tiny["root"] / name)
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
    with pytest.raises(Exception, match="fsdp does not run adapter: adalora"):
        TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tiny["root"] / "x", distributed="fsdp",
                                        adapter="adalora"))
    with pytest.raises(Exception, match="fsdp runs optimizer: adamw only"):
        TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tiny["root"] / "x", distributed="fsdp",
                                        optimizer="adamw8bit"))
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
