"""benchmarks/loftq_error.py still runs: one SmolLM2 layer, one iteration, its table's values (a subprocess)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loftq_error.py"


@pytest.mark.slow
def test_loftq_error_one_layer_beats_nf4_and_matches_peft(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--iters", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"loftq_error.py exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert "PEFT: " in proc.stdout
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in out.read_text().splitlines() if line.startswith("| "))}
    assert rows["weights"][3:] == ["lorakit LoftQ, 1 iter", "peft LoftQ, 1 iter", "bit-identical"]
    assert set(rows) == {"weights", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all"}
    for name, cells in rows.items():
        if name == "weights":
            continue
        nf4_relative, ours, theirs = (float(c) for c in cells[2:5])
        assert 0.01 < nf4_relative < 0.5  # NF4's own error relative to the weight
        assert ours < 0.99  # LoftQ's error is below NF4's alone
        assert ours == theirs and cells[5] == "yes"  # PEFT's steps give the same factors, bit for bit
    assert float(rows["all"][1]) == 7
