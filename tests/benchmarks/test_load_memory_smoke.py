"""benchmarks/load_memory.py --tiny: a few-MB sharded Llama loaded by each loader in its own process (~1 min)."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_memory.py"
# benchmarks/load_memory.py's TINY shape, restated so the counts below do not trust the script's own figures.
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 4096, 256, 704, 4, 4, 2


def nf4_linear_bytes(n: int) -> int:
    """Packed codes (2 a byte), a uint8 absmax per 64, an fp32 per 256 absmax, the offset and the 256-entry code."""
    return n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 4 * 256


def test_load_memory_tiny_stays_under_the_bound_and_counts_the_model(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--workdir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"load_memory.py exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    summary = json.loads(out.read_text())
    assert not (tmp_path / "llama-tiny-random-bf16").exists()  # removed without --keep

    head_dim = HIDDEN // HEADS
    linears = [HIDDEN * HIDDEN, HIDDEN * KV_HEADS * head_dim, HIDDEN * KV_HEADS * head_dim, HIDDEN * HIDDEN,
               HIDDEN * INTERMEDIATE, HIDDEN * INTERMEDIATE, INTERMEDIATE * HIDDEN]
    bf16_rest = 2 * (2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN)  # embeddings, untied head, norms
    rope = 2 * 4 * head_dim // 2  # fp32 inv_freq and original_inv_freq
    quant_map = 4 * 16  # the NF4 code table, one tensor shared by every layer
    four_bit = LAYERS * sum(nf4_linear_bytes(n) for n in linears) + bf16_rest + rope + quant_map
    assert summary["four_bit_model_bytes"] == four_bit
    assert summary["layer_bf16_bytes"] == 2 * (sum(linears) + 2 * HIDDEN)
    assert summary["bound_bytes"] == round(1.3 * (four_bit + summary["layer_bf16_bytes"]))
    assert summary["parameters"] == LAYERS * (sum(linears) + 2 * HIDDEN) + 2 * VOCAB * HIDDEN + HIDDEN
    assert summary["shards"] > 3

    rows = {row["loader"]: row for row in summary["rows"]}
    assert set(rows) == {"lorakit", "bnb", "bf16"}
    assert rows["lorakit"]["linear4bit_layers"] == 7 * LAYERS
    for row in rows.values():
        assert 0 < row["baseline_rss_bytes"] <= row["peak_rss_bytes"]
        assert abs(row["vm_hwm_bytes"] - row["peak_rss_bytes"]) <= 0.01 * row["peak_rss_bytes"]
    lorakit = rows["lorakit"]
    assert lorakit["peak_rss_bytes"] - lorakit["baseline_rss_bytes"] <= summary["bound_bytes"]
    assert summary["met"] is True

    table = proc.stdout[proc.stdout.index("loader "):].splitlines()
    assert len(table) == 5 and table[2].startswith("lorakit load_model(nf4)")
    cells = table[2].split()  # name (2 words), peak, baseline, peak - baseline, ratio, verdict, anon, file
    assert float(cells[5].rstrip("x")) <= 1 and cells[6] == "met"
    assert int(cells[4].replace(",", "")) == round((lorakit["peak_rss_bytes"] - lorakit["baseline_rss_bytes"]) / 1e6)
