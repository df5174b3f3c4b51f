"""End to end on the real embedded model: `lorakit demo` teaches it the date task (the proof that training works)."""

import json

import pytest

from lorakit.cli import main


@pytest.mark.slow
def test_demo_meets_its_targets_and_the_adapter_generates(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("base_accuracy", "tuned_accuracy", "train_seconds", "adapter_bytes", "quant_type",
                "trainable_params", "total_params"):
        assert key in results
    assert results["heldout_examples"] >= 100
    assert results["base_accuracy"] <= 0.3
    assert results["tuned_accuracy"] >= 0.9
    assert results["quant_type"] == "nf4" and results["lora"]["r"] == 16
    run = out / "train"
    for artifact in ("config.yaml", "metrics.jsonl", "loss.png", "results.json", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors", "checkpoint/trainer_state.pt"):
        assert (run / artifact).exists(), artifact
    assert list((run / "tensorboard").iterdir())
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    example = results["examples"][0]
    assert main(["generate", "--adapter", str(run / "adapter"), "--system",
                 "You convert dates to ISO 8601. Reply with the date only, as YYYY-MM-DD.",
                 "--prompt", example["input"], "--max-new-tokens", "12"]) == 0
    assert example["expected"] in capsys.readouterr().out
