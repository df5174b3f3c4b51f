"""The benchmark scripts still run: each --tiny mode exits 0 and prints its table (subprocesses, ~1 min)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_benchmark(script: str, *args: str) -> str:
    """Run benchmarks/<script> with args; return its stdout, failing the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_train_step_tiny_prints_its_table(tmp_path):
    # Four rows (a subprocess each, timed in two interleaved rounds) cover lorakit's trainer step, a user's
    # own loop with lk.enable_fast_training, peft + bitsandbytes and the ratio baseline.
    json_path = tmp_path / "rows.json"
    rows_arg = "lorakit-qlora,lorakit-qlora-plain-loop,peft-bnb-qlora,peft-bf16-autocast"
    out = run_benchmark("train_step.py", "--tiny", "--rows", rows_arg, "--steps", "2", "--json", str(json_path))
    assert "row                         tokens/s vs peft bf16" in out
    table = out[out.index("tokens/s vs peft bf16"):].splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:] if line.strip()}
    assert set(rows) == {"lorakit-qlora", "lorakit-qlora-plain-loop", "peft-bnb-qlora", "peft-bf16-autocast"}
    # median ratio, paired ratio and the paired ratios' quartiles
    assert rows["peft-bf16-autocast"][2:5] == ["1.00x", "1.00x", "1.00-1.00"]
    for row in rows.values():
        q1, q3 = (float(x) for x in row[4].split("-"))
        assert q1 <= float(row[3].rstrip("x")) <= q3
    assert all(float(row[1]) > 0 and float(row[7]) > 0 for row in rows.values())  # tokens/s, peak tensor MB
    assert all(int(row[6].replace(",", "")) >= 0 for row in rows.values())  # page faults per step
    # Same weights, same batch, same adapter size: both sides train the same thing.
    assert rows["lorakit-qlora"][-1] == rows["peft-bnb-qlora"][-1] == "32,768"
    assert float(rows["lorakit-qlora"][-2]) == pytest.approx(float(rows["peft-bnb-qlora"][-2]), abs=0.02)
    # The plain loop trains the same adapter on the same 4-bit base (no autocast: bf16 weights throughout).
    assert rows["lorakit-qlora-plain-loop"][-1] == "32,768"
    assert float(rows["lorakit-qlora-plain-loop"][-2]) == pytest.approx(float(rows["lorakit-qlora"][-2]), abs=0.02)
    summary = json.loads(json_path.read_text())
    assert [len(row["seconds"]) for row in summary["rows"]] == [2, 2, 2, 2]  # one step per row per round
    assert all(row["peak_tensor_bytes"] > 0 for row in summary["rows"])


def test_memory_validation_tiny_prints_its_table():
    out = run_benchmark("memory_validation.py", "--tiny")
    assert "measured MB predicted MB   error tracker MB" in out
    rows = [line for line in out.splitlines() if line.startswith(("lora ", "qlora "))]
    assert len(rows) == 4  # two progress lines and two table rows
    for row in rows:  # the estimate within 15% of the allocator's measured peak
        assert abs(float(row.split("%")[0].split()[-1])) <= 15, row


def test_memory_process_tiny_predicts_the_train_processes_max_rss():
    # Two real `lorakit train` processes; their max RSS (from the kernel) against `lorakit estimate CONFIG --json`.
    out = run_benchmark("memory_process.py", "--tiny")
    table = out[out.index("method ckpt"):].splitlines()[2:]
    assert [row.split()[:2] for row in table] == [["lora", "no"], ["qlora", "yes"]]
    for row in table:
        measured, predicted, error = row.split()[5:8]
        # the table's MB are rounded, so its error column is recomputed to within that rounding
        assert float(error.rstrip("%")) == pytest.approx(100 * (float(predicted) / float(measured) - 1), abs=0.3)
        assert abs(float(error.rstrip("%"))) <= 15, row


def test_dequant_tiny_prints_its_table():
    out = run_benchmark("dequant.py", "--tiny")
    assert "method                    ms     GB/s  % copy  vs bnb" in out
    assert "lorakit reference" in out


def test_quant_error_tiny_prints_its_table():
    out = run_benchmark("quant_error.py", "--tiny")
    assert "| weights | MSE | MSE / mean(w^2) |" in out
    assert "| model (linears) | perplexity | bytes/weight of linears | seconds |" in out
    assert "Weights not stored in 4 bits" in out and "| INT4 (absmax/7), bf16 compute |" in out
    # NF4's code beats FP4's on every weight set (three tables), the random-init tiny weights included
    nf4 = [float(line.split("|")[2]) for line in out.splitlines() if line.startswith("| NF4 |")]
    fp4 = [float(line.split("|")[2]) for line in out.splitlines() if line.startswith("| FP4 |")]
    assert len(nf4) == len(fp4) == 3 and all(n < f for n, f in zip(nf4, fp4))


def test_optim_step_tiny_prints_its_table(tmp_path):
    json_path = tmp_path / "optim_step.json"
    out = run_benchmark("optim_step.py", "--tiny", "--json", str(json_path))
    assert "optimizer                                 step ms  vs bnb  paired state B/param" in out
    results = json.loads(json_path.read_text())
    rows = results["rows"]
    assert list(rows) == ["lorakit AdamW8bit", "lorakit AdamW8bit, one tensor at a time", "bitsandbytes AdamW8bit",
                          "torch AdamW (fused)", "torch AdamW (foreach)"]
    assert results["steps"] == 3 and results["min_8bit_size"] == 256 and results["tensors"] == 28
    assert all(len(row["seconds"]) == 3 and row["median_ms"] > 0 for row in rows.values())
    assert rows["bitsandbytes AdamW8bit"]["vs_baseline"] == rows["bitsandbytes AdamW8bit"]["paired"] == 1.0
    # Every tiny adapter tensor is 8-bit in whole blocks: 2 x (1 byte + a 4-byte absmax per 256); fp32 AdamW 8.
    assert rows["lorakit AdamW8bit"]["state_bytes_per_param"] == 2 * (1 + 4 / 256)
    assert rows["lorakit AdamW8bit, one tensor at a time"]["state_bytes_per_param"] == 2 * (1 + 4 / 256)
    assert rows["torch AdamW (fused)"]["state_bytes_per_param"] == rows["torch AdamW (foreach)"][
        "state_bytes_per_param"] == 8.0
    # bitsandbytes also keeps its two 256-entry fp32 code maps (shared by every tensor, counted once)
    expected_bnb = 2 * (1 + 4 / 256) + 2 * 256 * 4 / results["params"]
    assert rows["bitsandbytes AdamW8bit"]["state_bytes_per_param"] == pytest.approx(expected_bnb)


def test_serve_tiny_prints_its_table(tmp_path):
    json_path = tmp_path / "serve.json"
    rows_arg = "lorakit-8,lorakit-merged,peft-mixed-64,scale"
    out = run_benchmark("serve.py", "--tiny", "--rounds", "2", "--rows", rows_arg, "--json", str(json_path))
    table = out[out.index("row                   tokens/s"):].splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:] if line.strip()}
    assert set(rows) == set(rows_arg.split(","))
    assert rows["peft-mixed-64"][2] == "1.00x" and rows["lorakit-merged"][3] == "1.00x"
    runs = json.loads(json_path.read_text())["rows"]
    assert {row: len(r) for row, r in runs.items()} == {"lorakit-8": 2, "lorakit-merged": 2, "peft-mixed-64": 2,
                                                        "scale": 1}  # every row per round, scale once
    ratios = sorted(a["tokens"] / a["seconds"] / (b["tokens"] / b["seconds"])
                    for a, b in zip(runs["lorakit-8"], runs["peft-mixed-64"]))
    assert rows["lorakit-8"][2] == f"{sum(ratios) / 2:.2f}x"  # the median of the per-round (paired) ratios
    summary = {row: r[0] for row, r in runs.items()}
    # 8 requests x 8 new tokens each (16 x 8 for the scale row), every one served; the scale row's memory bound
    assert all(summary[row]["tokens"] <= 64 and summary[row]["tokens"] > 0 for row in ("lorakit-8", "peft-mixed-64"))
    assert summary["scale"]["tokens"] > 0 and 0 < summary["scale"]["most_in_memory"] <= 20
    assert all(len(summary[row]["ttft"]) == 8 for row in ("lorakit-8", "lorakit-merged", "peft-mixed-64"))


def test_serve_http_tiny_prints_its_table_and_plot(tmp_path):
    json_path, png = tmp_path / "http.json", tmp_path / "latency.png"
    out = run_benchmark("serve_http.py", "--tiny", "--rates", "2,6", "--seconds", "2", "--json", str(json_path),
                        "--plot", str(png))
    assert "rate req/s" in out and f"plot written to {png}" in out
    rows = json.loads(json_path.read_text())["rows"]
    assert [row["rate"] for row in rows] == [2.0, 6.0]
    for row in rows:  # every request answered, none refused, latencies measured
        assert row["requests"] >= 1 and row["completed"] == row["requests"] and row["errors"] == 0
        assert row["tokens_per_s"] > 0 and 0 < row["ttft_p50"] <= row["ttft_p99"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_routing_tiny_trains_routes_and_scores(tmp_path):
    json_path = tmp_path / "routing.json"
    out = run_benchmark("routing.py", "--tiny", "--json", str(json_path))
    assert "routed right" in out and "routed to (rows: the prompt's task)" in out
    result = json.loads(json_path.read_text())
    assert set(result["rows"]) == {"dates", "numbers", "snake", "all"}
    for row in result["rows"].values():
        assert all(0.0 <= row[key] <= 1.0 for key in ("routed_right", "by hand", "auto", "base"))
    # every held-out prompt went somewhere, and the confusion counts add up to the routed-right share
    confusion = result["confusion"]
    assert sum(sum(row.values()) for row in confusion.values()) == result["rows"]["all"]["examples"] == 12
    right = sum(confusion[task][task] for task in confusion)
    assert right / 12 == pytest.approx(result["rows"]["all"]["routed_right"])


def test_scaling_tiny_counts_the_adapter_gradients_and_agrees_on_the_loss(tmp_path):
    """1 process, 2 with DDP, 2 with FSDP2 run the same step: DDP hands the adapter's gradients to the
    all-reduce; FSDP holds about half the model per process and moves the base's shards instead."""
    out = run_benchmark("scaling.py", "--tiny", "--steps", "1", "--json", str(tmp_path / "s.json"))
    assert " kind procs  step s  tokens/s" in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    one, ddp, fsdp = rows["none-1"], rows["ddp-2"], rows["fsdp-2"]
    assert one[0]["bytes_handed"] == 0  # one process all-reduces nothing
    # DDP hands every adapter gradient (fp32) to the all-reduce exactly once per step, on each process.
    assert [f["bytes_handed"] for f in ddp] == [ddp[0]["trainable_bytes"]] * 2 == [131_072] * 2
    assert [f["bytes_wire"] for f in ddp] == [131_072] * 2  # 2(p-1)/p of it, p = 2
    # FSDP: the whole model gathered in the forward, the layers again in the backward, the adapter's
    # gradients reduce-scattered; each process keeps its half of the sharded tensors.
    assert all(f["bytes_handed"] > one[0]["held_bytes"] + ddp[0]["trainable_bytes"] for f in fsdp)
    assert all(f["bytes_wire"] * 2 == pytest.approx(f["bytes_handed"], rel=1e-6) for f in fsdp)
    assert all(f["held_bytes"] < 0.6 * one[0]["held_bytes"] for f in fsdp)
    assert [f["held_bytes"] for f in ddp] == [one[0]["held_bytes"]] * 2
    for figures in (ddp, fsdp):
        assert sum(f["loss"] for f in figures) / 2 == pytest.approx(one[0]["loss"], abs=2e-2)  # bf16 rounding
    assert all(f["peak_rss_bytes"] > 0 and f["step_s"] > 0 for f in one + ddp + fsdp)
