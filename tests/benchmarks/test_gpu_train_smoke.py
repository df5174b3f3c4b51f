"""benchmarks/gpu_train.py runs on the CPU at the tiny shape through the GPU run's code path, and its figures add up."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train.py"


def load_script():
    """benchmarks/gpu_train.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # four subprocesses, each importing torch + transformers (+ peft, bitsandbytes): 65-85 s here
def test_tiny_cpu_run_measures_every_row(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    json_path = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--method", "both",
                           "--rows", "lorakit,peft", "--warmup", "1", "--steps", "1", "--json", str(json_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"gpu_train.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "method row        tokens/s vs peft   step s" in proc.stdout
    assert "FLOPs/token = 4N + 6*L*T*H*d_head" in proc.stdout
    summary = json.loads(json_path.read_text())
    rows = {(r["method"], r["row"]): r for r in summary["rows"]}
    assert set(rows) == {(m, lib) for m in ("lora", "qlora") for lib in ("lorakit", "peft")}
    assert all("error" not in r for r in rows.values()), rows
    for row in rows.values():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(summary["batch"] * summary["seq"] / row["step_s"])
        assert len(row["seconds"]) == 1 and len(row["losses"]) == 2  # 1 timed step after 1 warm-up
        assert row["peak_bytes"] > 0 and row["peak_rss_bytes"] > 0
        assert row["trainable_params"] == 45_056  # r=16 on 7 linears x 2 layers: both libraries adapt the same
        # A random-init model predicts about uniformly over the vocabulary.
        assert row["first_loss"] == pytest.approx(math.log(summary["vocab"]), abs=0.2)
        # MFU from the stated formula: 4N + 6*L*T*H*d_head FLOPs per token.
        flops = 4 * summary["matmul_params"] + 6 * summary["layers"] * summary["seq"] * summary["heads"] * \
            summary["head_dim"]
        assert summary["flops_per_token"]["total"] == flops
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / (summary["peak_tflops"] * 1e12))
    # Same weights (seeded build), same batch, LoRA B = 0: the first losses differ by compute paths only
    # (peft's prepare_model_for_kbit_training runs norms and embeddings in fp32 for QLoRA).
    for method in ("lora", "qlora"):
        assert rows[(method, "lorakit")]["first_loss"] == pytest.approx(rows[(method, "peft")]["first_loss"],
                                                                        abs=0.01)


@pytest.mark.parametrize("shape,total_params", [("1b", 1_235_814_400), ("8b", 8_030_261_248),
                                                ("70b", 70_553_706_496)])
def test_shapes_are_llama_3s_and_n_counts_their_linears(shape, total_params):
    # Built on the meta device: no memory. The totals are the published Llama 3.2 1B / 3.1 8B / 3.1 70B sizes.
    from transformers import AutoModelForCausalLM

    gpu_train = load_script()
    config = gpu_train.llama_config(shape, 2048)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == total_params
    linears = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    assert gpu_train.matmul_params(config) == sum(linears.values())


def test_bnb_swap_in_place_matches_transformers_from_pretrained(tmp_path):
    # The peft row quantizes while it builds; a user loads with from_pretrained(quantization_config=...).
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    gpu_train = load_script()
    cpu = torch.device("cpu")
    gpu_train.build_model(gpu_train.llama_config("tiny", 64), cpu, None).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu",
                                                  dtype=torch.bfloat16, attn_implementation="sdpa")
    built = gpu_train.build_model(gpu_train.llama_config("tiny", 64), cpu, gpu_train.bnb_quantize)
    ours, theirs = dict(built.named_modules()), dict(loaded.named_modules())
    quantized = [name for name, m in theirs.items() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 14 and all(type(ours[name]).__name__ == "Linear4bit" for name in quantized)
    for name in quantized:
        assert torch.equal(ours[name].weight.data, theirs[name].weight.data)  # the packed codes
    ids = gpu_train.token_batch(1024, 2, 64, cpu)
    for training in (True, False):  # bnb's CPU Linear4bit takes another kernel in eval mode: compare like with like
        built.train(training), loaded.train(training)
        with torch.no_grad():
            assert torch.equal(built(input_ids=ids).logits, loaded(input_ids=ids).logits)
