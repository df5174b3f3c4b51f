"""The training loop on a tiny random Llama with the real SmolLM2 tokenizer: loss, run folder, schedule,
accumulation, validation, overfitting signal, NaN stop, and resume after SIGKILL / Ctrl-C."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_tiny_model_folder, tiny_train_config

from lorakit.cli import main
from lorakit.train import data as data_mod
from lorakit.train.checkpoint import STATE_NAME
from lorakit.train.config import TrainConfig
from lorakit.train.demo_task import make_examples, write_jsonl
from lorakit.train.trainer import accumulate_gradients, lr_lambda, train
from lorakit.train.watch import OverfitWatch

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model_folder(root / "model")
    train_file = write_jsonl(make_examples(64, seed=0), root / "train.jsonl")
    val_file = write_jsonl(make_examples(8, seed=1), root / "val.jsonl")
    return {"model": model_dir, "train": train_file, "val": val_file, "root": root}


@pytest.fixture(scope="module")
def finished_run(tiny) -> tuple[Path, dict, TrainConfig]:
    run_dir = tiny["root"] / "run20"
    cfg = TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], run_dir, val_fraction=0.25,
                                          eval_every=5, tensorboard=True))
    return run_dir, train(cfg, progress=False), cfg


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- a finished run

def test_loss_decreases_over_20_steps(finished_run):
    run_dir, results, _ = finished_run
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    assert results["final_loss"] == pytest.approx(losses[-1], abs=1e-6)


def test_run_folder_holds_every_artifact(finished_run):
    run_dir, results, cfg = finished_run
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg.to_dict()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))
    for record in records:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(record)
        assert record["tokens_per_s"] > 0
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["steps"] == 20 and saved["adapter_dir"] == str(run_dir / "adapter")
    assert saved["adapter_bytes"] == sum(f.stat().st_size for f in (run_dir / "adapter").iterdir())
    assert saved["trainable_params"] > 0 and saved["total_params"] > saved["trainable_params"]
    assert (run_dir / "checkpoint" / STATE_NAME).is_file()  # kept so a finished run can be extended


def test_tensorboard_events_hold_the_logged_losses(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == list(range(1, 21))
    expected = [r["loss"] for r in read_metrics(run_dir)]
    assert [e.value for e in logged] == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [5, 10, 15, 20]


def test_final_adapter_loads_in_peft_and_matches_lorakit(finished_run, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_model
    from lorakit.peft_format import load_adapter

    run_dir, _, _ = finished_run
    ids = torch.tensor([[1, 500, 1200, 37, 9000, 2]])
    base = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        expected = PeftModel.from_pretrained(base, run_dir / "adapter").eval()(input_ids=ids).logits
        ours, _ = load_model(str(tiny["model"]))
        load_adapter(ours, run_dir / "adapter")
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - plain).abs().max() > 1e-3  # the trained adapter changes the output


def test_logged_lr_is_warmup_then_cosine(finished_run):
    run_dir, _, cfg = finished_run
    lrs = [r["lr"] for r in read_metrics(run_dir)]
    factor = lr_lambda(total_steps=20, warmup_steps=2, kind="cosine")  # ceil(0.1 * 20) warmup steps
    assert lrs == pytest.approx([cfg.learning_rate * factor(s) for s in range(1, 21)], rel=1e-12)
    assert lrs[0] < lrs[1] == pytest.approx(cfg.learning_rate)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == 0.0


@pytest.mark.parametrize("kind, at_end", [("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)])
def test_lr_lambda_warmup_and_decay(kind, at_end):
    factor = lr_lambda(total_steps=10, warmup_steps=4, kind=kind)
    assert [factor(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factor(4) == 1.0 and factor(10) == pytest.approx(at_end)
    middle = {"linear": 0.5, "cosine": 0.5, "constant": 1.0}[kind]
    assert factor(7) == pytest.approx(middle)


def test_val_loss_logged_every_eval_every_with_val_fraction(finished_run):
    run_dir, results, _ = finished_run
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10, 15, 20]
    assert results["data"]["val_examples"] == 16 and results["data"]["examples"] == 48
    assert results["val_loss"] == pytest.approx(records[-1]["val_loss"], abs=1e-6)


def test_val_loss_from_val_file(tiny, tmp_path):
    cfg = TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", max_steps=3,
                                          val_file=str(tiny["val"]), eval_every=2))
    results = train(cfg, progress=False)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "val_loss" in r] == [2, 3]
    assert results["data"]["val_examples"] == 8 and all(math.isfinite(r.get("val_loss", 0)) for r in records)


def test_qlora_nf4_run_learns_and_accumulates(tiny, tmp_path):
    cfg = TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", quantize="nf4",
                                          max_steps=8, batch_size=2, gradient_accumulation_steps=2,
                                          learning_rate=3e-2))
    results = train(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert results["steps"] == 8


# ------------------------------------------------------------------------------------------- accumulation

def test_accumulation_equals_one_big_batch(tiny):
    """2 micro-batches of 2 give batch 4's loss and gradients even when their label counts differ."""
    from lorakit.config import LoraConfig
    from lorakit.inject import add_adapter
    from lorakit.models import load_model

    model, tokenizer = load_model(str(tiny["model"]))
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    texts = ["a short one", "the second text is quite a bit longer than the first text",
             "three", "and the fourth and last text runs longest of all of them, by a fair margin indeed"]
    items = [data_mod.tokenize_example({"text": t}, tokenizer, 64) for t in texts]
    pad = tokenizer.pad_token_id
    halves = [data_mod.collate(items[:2], pad), data_mod.collate(items[2:], pad)]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in halves]
    assert counts[0] != counts[1]  # otherwise a plain 1/accum weighting would pass too

    def grads_after(batches):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, batches, chunked=True, bf16=False)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    big_loss, big_grads = grads_after([data_mod.collate(items, pad)])
    acc_loss, acc_grads = grads_after(halves)
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)
    assert big_grads.keys() == acc_grads.keys() and len(big_grads) == 28  # 7 linears x 2 layers x (A, B)
    for name in big_grads:
        torch.testing.assert_close(acc_grads[name], big_grads[name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- overfitting

def test_overfit_watch_fires_when_val_rises_while_train_falls():
    watch = OverfitWatch()
    assert watch.update(2.0, 1.5) is None
    assert watch.update(1.8, 1.6) is None
    message = watch.update(1.6, 1.7)
    assert message is not None and "overfitting" in message and "1.5000 -> 1.7000" in message


@pytest.mark.parametrize("curve", [
    [(2.0, 2.1), (1.8, 1.9), (1.6, 1.7), (1.4, 1.5)],   # both falling
    [(2.0, 1.5), (2.1, 1.6), (2.2, 1.7)],               # val rising, but train rising too
    [(2.0, 1.5), (1.8, 1.6), (1.6, 1.55)],              # one rise, then a fall
])
def test_overfit_watch_quiet_otherwise(curve):
    watch = OverfitWatch()
    assert [watch.update(t, v) for t, v in curve] == [None] * len(curve)


# ------------------------------------------------------------------------------------------- resume

def test_resume_takes_the_configs_learning_rate(tiny, tmp_path):
    """A resumed run uses the config's peak lr (the advice after a NaN stop), on the schedule of the new total."""
    settings = tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", max_steps=2, warmup_ratio=0.0)
    train(TrainConfig(**settings), progress=False)
    train(TrainConfig(**{**settings, "max_steps": 4, "learning_rate": 5e-3}), resume=True, progress=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    factor = lr_lambda(4, 0, "cosine")
    assert lrs[2:] == pytest.approx([5e-3 * factor(3), 5e-3 * factor(4)], rel=1e-12)


def _write_run_yaml(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def _start_cli_train(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit.cli", "train", str(config), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        assert proc.poll() is None, f"training exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    # Dropout makes the comparison also cover the restored RNG state.
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
    settings = tiny_train_config(tiny["model"], tiny["train"], tmp_path / "a", max_steps=14, save_every=3,
                                 lora=lora)
    train(TrainConfig(**settings), progress=False)
    expected = read_metrics(tmp_path / "a")

    config = _write_run_yaml(tmp_path / "b.yaml", {**settings, "output_dir": str(tmp_path / "b")})
    proc = _start_cli_train(config)
    _wait_for(tmp_path / "b" / "checkpoint" / STATE_NAME, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "results.json").exists()
    killed_at = torch.load(tmp_path / "b" / "checkpoint" / STATE_NAME, weights_only=True)["step"]
    assert 3 <= killed_at < 14

    assert main(["train", str(config), "--resume", "--quiet"]) == 0
    resumed = read_metrics(tmp_path / "b")
    assert [r["step"] for r in resumed] == list(range(1, 15))
    assert [(r["loss"], r["lr"]) for r in resumed] == [(r["loss"], r["lr"]) for r in expected]
    a_adapter = (tmp_path / "a" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == a_adapter


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny, tmp_path):
    settings = tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", max_steps=400, save_every=2)
    proc = _start_cli_train(_write_run_yaml(tmp_path / "run.yaml", settings))
    _wait_for(tmp_path / "run" / "checkpoint" / STATE_NAME, proc)
    time.sleep(0.5)  # into a later step, so the saved step is the interrupted one, not the periodic one
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    errors = stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("lorakit: error: ") and "--resume" in errors[0], stderr
    saved_step = torch.load(tmp_path / "run" / "checkpoint" / STATE_NAME, weights_only=True)["step"]
    assert f"interrupted at step {saved_step}:" in errors[0]
    assert saved_step == read_metrics(tmp_path / "run")[-1]["step"]


# ------------------------------------------------------------------------------------------- NaN

def test_nan_loss_stops_with_exit_3_and_keeps_the_checkpoint(tiny, tmp_path, capsys):
    # transformers' sdpa turns this exploding run into NaN within a few steps; lorakit's CPU attention
    # does not (RMSNorm zeroes the overflowed residual first and the loss sits at ln(vocab)).
    settings = tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", max_steps=30, save_every=1,
                                 learning_rate=1e6, max_grad_norm=0.0, warmup_ratio=0.0, attn_implementation="sdpa")
    config = _write_run_yaml(tmp_path / "run.yaml", settings)
    assert main(["train", str(config), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("lorakit: error: loss is ") and "--resume" in err
    state = torch.load(tmp_path / "run" / "checkpoint" / STATE_NAME, weights_only=True)
    stopped_at = int(err.split(" at step ")[1].split(":")[0])
    # The kept checkpoint is the last whose weights gave a finite loss on the next step (the one before the NaN).
    assert state["step"] == stopped_at - 2 and math.isfinite(state["last_loss"])
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run")}
    assert sorted(losses) == list(range(1, stopped_at)) and all(math.isfinite(x) for x in losses.values())
    assert not (tmp_path / "run" / "results.json").exists()


# ------------------------------------------------------------------------------------------- Ctrl-C

def test_stop_request_first_ctrl_c_sets_a_flag_second_interrupts():
    from lorakit.train.trainer import StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        signal.raise_signal(signal.SIGINT)  # first: only a flag, the step goes on
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # second: at once
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------------- switches

@pytest.mark.parametrize("fast", [True, False])
def test_fast_kernels_key_switches_the_fast_paths_on_the_given_model(tiny, tmp_path, fast):
    from lorakit.models import load_model

    model, tokenizer = load_model(str(tiny["model"]), attn_implementation="sdpa")
    cfg = TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", max_steps=1,
                                          fast_kernels=fast))
    train(cfg, model=model, tokenizer=tokenizer, progress=False)
    patched = [name for name, module in model.named_modules() if "forward" in module.__dict__]
    if fast:  # two norms and one MLP per layer, the final norm; attention follows attn_implementation=auto
        assert len(patched) == 3 * 2 + 1 and model.config._attn_implementation == "lorakit_cpu"
    else:
        assert patched == [] and model.config._attn_implementation == "sdpa"


def test_fast_kernels_false_trains_with_transformers_attention(tiny, tmp_path):
    from lorakit.train.trainer import load_inputs

    for fast, expected in ((True, "lorakit_cpu"), (False, "sdpa")):
        cfg = TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", fast_kernels=fast))
        assert load_inputs(cfg, None, None)[0].config._attn_implementation == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_anything_loads(tiny, tmp_path):
    from lorakit.errors import LorakitError

    cfg = TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run", device="cuda"))
    with pytest.raises(LorakitError, match="device: cuda, but PyTorch sees no CUDA device here; set device: cpu"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_device_cpu_trains_like_auto(tiny, tmp_path):
    results = {}
    for device in ("auto", "cpu"):
        cfg = TrainConfig(**tiny_train_config(tiny["model"], tiny["train"], tmp_path / device, max_steps=2,
                                              device=device))
        results[device] = train(cfg, progress=False)["final_loss"]
    if not torch.cuda.is_available():  # auto is the CPU here: the same run bit for bit
        assert results["auto"] == results["cpu"]
    assert math.isfinite(results["cpu"])
