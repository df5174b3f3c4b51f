"""`lorakit estimate` predicts the run `lorakit train` would start: same defaults, same config file, same switches."""

import json

import pytest
import torch
import yaml
from helpers import build_tiny_model_folder

from lorakit.cli import main
from lorakit.memory import ModelShape, StepSettings, attention_kind, estimate, load_shape, nf4_bytes, parameter_tensors
from lorakit.train.config import TrainConfig, load_config
from lorakit.train.estimate import JSON_KEYS, RUNTIME_BASELINE_BYTES, estimate_run

SMOL = ModelShape.from_name("smollm2-135m")


def estimate_json(capsys, *argv) -> dict:
    assert main(["estimate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_without_a_config_the_trainers_defaults_apply(capsys):
    got = estimate_json(capsys)
    defaults = TrainConfig()
    step = estimate(SMOL, StepSettings(method="qlora", rank=16, batch=defaults.batch_size,
                                       seq_len=defaults.max_seq_len, gradient_checkpointing=False,
                                       attention=attention_kind("cpu", defaults.max_seq_len)))
    assert list(got) == list(JSON_KEYS)
    assert (got["method"], got["device"], got["model"]) == ("qlora", "cpu", "smollm2-135m-instruct")
    assert got["train_peak_bytes"] == step.total and got["activations_bytes"] == step.activations
    assert got["trainable_params"] == step.trainable_params == 4_884_480  # r=16 on all 7 linears x 30 layers
    assert got["process_peak_bytes"] == RUNTIME_BASELINE_BYTES + max(got["load_peak_bytes"], step.total)
    assert got["device_peak_bytes"] is None


def test_a_config_file_is_the_run_it_describes(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"quantize": None, "bf16": False, "batch_size": 2, "max_seq_len": 128,
                                      "gradient_checkpointing": True, "optimizer": "adamw8bit",
                                      "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}))
    got = estimate_json(capsys, str(config))
    params = sum(numel for _, numel in parameter_tensors(SMOL))
    assert got["method"] == "lora" and got["weights_bytes"] == 4 * params  # bf16: false keeps an fp32 base
    step = estimate(SMOL, StepSettings(method="lora", rank=8, targets=("q_proj", "v_proj"), batch=2, seq_len=128,
                                       optimizer="adamw8bit", gradient_checkpointing=True,
                                       compute_dtype=torch.float32, attention=attention_kind("cpu", 128)))
    assert got["train_peak_bytes"] == step.total and got["optimizer_bytes"] == step.optimizer
    assert got == estimate_run(load_config(config)).as_json()
    # flags and --set override the file; --method qlora quantizes the base
    over = estimate_json(capsys, str(config), "--method", "qlora", "--batch", "4", "--set", "bf16=true")
    linears = sum(nf4_bytes(n) for name, n in parameter_tensors(SMOL) if name.endswith("_proj"))
    others = sum(2 * n for name, n in parameter_tensors(SMOL) if not name.endswith("_proj"))
    assert over["method"] == "qlora" and over["weights_bytes"] == pytest.approx(linears + others)
    qlora = StepSettings(method="qlora", rank=8, targets=("q_proj", "v_proj"), batch=4, seq_len=128,
                         gradient_checkpointing=True, attention="plain")
    assert over["activations_bytes"] == estimate(SMOL, qlora).activations


def test_the_table_names_every_term_and_the_process_total(capsys):
    assert main(["estimate", "--method", "lora", "--baseline-mb", "500"]) == 0
    out = capsys.readouterr().out
    for term in ("weights", "adapter", "gradients", "optimizer", "activations", "logits and loss",
                 "= training step peak", "load peak", "runtime baseline", "= process peak (RSS)"):
        assert term in out, term
    assert "runtime baseline          0.500 GB" in out


def test_on_a_gpu_the_step_is_device_memory_and_the_host_holds_the_rest(capsys):
    got = estimate_json(capsys, "--model", "llama-7b", "--device", "cuda", "--set", "optimizer=paged_adamw8bit")
    assert got["device_peak_bytes"] == got["train_peak_bytes"] > 0
    assert got["optimizer_host_bytes"] > got["optimizer_bytes"] > 0  # paged: one bucket on the device
    assert got["process_peak_bytes"] == got["runtime_baseline_bytes"] + max(got["load_peak_bytes"],
                                                                            got["optimizer_host_bytes"])


def test_a_model_is_named_as_the_trainer_names_it(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "tiny")
    shape = load_shape(str(folder))
    assert (shape.hidden, shape.layers, shape.vocab) == (32, 2, 49152)
    assert load_shape(str(folder / "model.safetensors")) == shape  # the config beside the weights
    assert load_shape(str(folder / "config.json")) == shape
    assert load_shape("smollm2-135m-instruct") == SMOL


def test_the_plot_is_checked_first_and_written_as_a_png(tmp_path, capsys):
    path = tmp_path / "m.png"
    assert main(["estimate", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
