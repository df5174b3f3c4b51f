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
    # the bar holds on unseen years and spellings too, not only overall
    assert results["heldout_ood_examples"] >= 100 and len(results["heldout_years"]) == 20
    assert results["tuned_accuracy_in_distribution"] >= 0.9 and results["tuned_accuracy_ood"] >= 0.9
    assert results["quant_type"] == "nf4" and results["lora"]["r"] == 16
    run = out / "train"
    for artifact in ("config.yaml", "metrics.jsonl", "loss.png", "results.json", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors", "checkpoint/trainer_state.pt"):
        assert (run / artifact).exists(), artifact
    assert list((run / "tensorboard").iterdir())
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    # what a user types first: a 19xx year in the two spellings the training set never shows
    for prompt, expected in (("Date: the 4th of July, 1999", "1999-07-04"), ("Date: Dec 25 1985", "1985-12-25"),
                             (results["examples"][0]["input"], results["examples"][0]["expected"])):
        assert main(["generate", "--adapter", str(run / "adapter"), "--system",
                     "You convert dates to ISO 8601. Reply with the date only, as YYYY-MM-DD.",
                     "--prompt", prompt, "--max-new-tokens", "12"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].strip() == expected, prompt
