"""The classes of defect from the hardening review, through the `lorakit` command on a tiny model.

--overwrite never loses a run before the new one has started; resume refuses what it cannot change and
records what it did change; a diverged run says so; empty answers are called out; an adapter knows
the base it was trained on; inspect reports what the tensors hold.
"""

import json
import math
import shutil
import warnings

import pytest
import torch
import yaml
from helpers import build_tiny_model_folder, tiny_train_config

from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.errors import LorakitWarning
from lorakit.fingerprint import base_fingerprint
from lorakit.inject import add_adapter
from lorakit.models import load_model
from lorakit.peft_format import load_adapter, save_adapter
from lorakit.train.demo_task import make_examples, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hardening")
    return {"model": build_tiny_model_folder(root / "model"), "root": root,
            "train": write_jsonl(make_examples(32, seed=0), root / "train.jsonl")}


def write_config(path, tiny, output_dir, **overrides):
    path.write_text(yaml.safe_dump(tiny_train_config(tiny["model"], tiny["train"], output_dir, **overrides)))
    return path


def tree(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tiny, tmp_path, capsys):
    """A finished 3-step run in tmp_path/runs/x and its config file."""
    config = write_config(tmp_path / "run.yaml", tiny, tmp_path / "runs" / "x", max_steps=3)
    assert main(["train", str(config), "--quiet"]) == 0
    capsys.readouterr()
    return config, tmp_path / "runs" / "x"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error: "), err
    return err[0]


@pytest.mark.parametrize("bad", ["model=/no/such/model", "train_file=/no/such/data.jsonl", "bad_data"])
def test_overwrite_keeps_the_previous_run_when_the_new_one_cannot_start(finished, bad, tmp_path, capsys):
    config, run = finished
    before = tree(run)
    if bad == "bad_data":
        broken = tmp_path / "broken.jsonl"
        broken.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{not json\n')
        bad = f"train_file={broken}"
    assert main(["train", str(config), "--set", bad, "--overwrite", "--quiet"]) == 2
    one_error_line(capsys)
    assert tree(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["x"]  # no stray copy beside it


def test_overwrite_replaces_the_run_once_the_new_one_has_stepped(finished, capsys):
    config, run = finished
    old_adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["train", str(config), "--set", "max_steps=2", "--set", "seed=7", "--overwrite", "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in run.parent.iterdir()) == ["x"]


def test_resume_refuses_a_setting_that_shapes_the_adapter_and_changes_nothing(finished, capsys):
    config, run = finished
    before = tree(run)
    assert main(["train", str(config), "--set", "max_steps=5", "--set", "lora.r=4", "--resume", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "--resume cannot change lora.r 8 -> 4" in line and "--overwrite" in line
    assert tree(run) == before


def test_resume_records_the_settings_it_changed(finished, capsys):
    config, run = finished
    assert main(["train", str(config), "--set", "max_steps=5", "--set", "learning_rate=0.005", "--resume",
                 "--quiet"]) == 0
    text = (run / "config.yaml").read_text()
    assert text.splitlines()[0] == "# resumed at step 3: max_steps 3 -> 5, learning_rate 0.01 -> 0.005"
    saved = yaml.safe_load(text)
    assert saved["learning_rate"] == 0.005 and saved["max_steps"] == 5 and saved["lora"]["r"] == 8
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 5
    assert results["resumes"] == [{"step": 3, "changed": {"learning_rate": [0.01, 0.005], "max_steps": [3, 5]}}]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_learning_rate_of_1e6_on_smollm2_is_flagged_on_the_progress_line_in_metrics_and_results(tmp_path, capsys):
    # The review's case: plain LoRA on the real model, loss pinned at ln(vocab) from the second step on.
    data = write_jsonl(make_examples(64, seed=0), tmp_path / "train.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": "smollm2-135m-instruct", "quantize": None, "train_file": str(data),
        "output_dir": str(tmp_path / "run"), "max_seq_len": 64, "batch_size": 2, "max_steps": 6,
        "learning_rate": 1e6, "warmup_ratio": 0.0,
        "lr_scheduler": "constant", "tensorboard": False, "save_every": 1000}))
    assert main(["train", str(config)]) == 0
    out, err = capsys.readouterr()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    flagged = [s["step"] for s in steps if s.get("warning") == "diverged"]
    assert steps[0]["loss"] < 0.9 * math.log(49152)  # a pretrained start, well below a uniform guess
    assert flagged == list(range(flagged[0], 7)) and flagged[0] <= 5, steps
    assert results["diverged_at_step"] is not None and results["diverged_at_step"] <= flagged[0]
    assert "DIVERGED" in err and "lower learning_rate" in err
    assert f"DIVERGED at step {results['diverged_at_step']}" in out


def test_a_healthy_run_is_not_flagged(finished):
    _, run = finished
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("warning" not in s for s in steps)
    assert json.loads((run / "results.json").read_text())["diverged_at_step"] is None


def test_some_empty_answers_warn_on_one_line(tiny, tmp_path, capsys):
    examples = make_examples(12, seed=1)
    for example in examples[:3]:
        example["messages"][-1]["content"] = "  "
    data = write_jsonl(examples, tmp_path / "data.jsonl")
    config = write_config(tmp_path / "run.yaml", {**tiny, "train": data}, tmp_path / "run", max_steps=1)
    assert main(["train", str(config), "--quiet"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakit: warning: ")]
    assert len(warned) == 1 and "3 of 12" in warned[0] and "left out" in warned[0], warned


def _adapter_on(model_dir, folder):
    model, _ = load_model(str(model_dir))
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return save_adapter(model, folder)


def test_an_adapter_warns_on_a_base_with_other_weights_and_not_on_its_own(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny["model"], other)
    model, _ = load_model(str(other))
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(1.5)  # same shapes, other weights
    model.save_pretrained(other)
    adapter = _adapter_on(tiny["model"], tmp_path / "adapter")
    for base in (load_model(str(tiny["model"]))[0], load_model(str(tiny["model"]), dtype=torch.bfloat16)[0],
                 load_model(str(tiny["model"]), quantize="nf4")[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # its own base, in any precision: no warning
            load_adapter(base, adapter)
    with pytest.warns(LorakitWarning, match="trained on a base with other weights"):
        load_adapter(load_model(str(other))[0], adapter)


def test_fingerprint_is_the_same_in_every_precision_and_differs_for_other_weights(tiny):
    prints = {base_fingerprint(load_model(str(tiny["model"]), **kwargs)[0])
              for kwargs in ({}, {"dtype": torch.bfloat16}, {"quantize": "nf4"}, {"quantize": "fp4"})}
    assert len(prints) == 1 and len(next(iter(prints))) == 16
    model, _ = load_model(str(tiny["model"]))
    with torch.no_grad():
        model.model.norm.weight.add_(0.25)
    assert base_fingerprint(model) not in prints


def test_merge_onto_another_base_warns_on_one_line(tiny, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny["model"], other)
    model, _ = load_model(str(other))
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    model.save_pretrained(other)
    adapter = _adapter_on(tiny["model"], tmp_path / "adapter")
    assert main(["merge", "--model", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "other weights" in line][0].startswith("lorakit: warning: ")


def test_inspect_flags_a_config_rank_the_tensors_do_not_have(tiny, tmp_path, capsys):
    adapter = _adapter_on(tiny["model"], tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH: 14 of 14 layers" in out and "config r=2, tensors r=4" in out
    assert "trained on: " in out
