"""Does `lorakit estimate CONFIG.yaml` predict the peak resident memory of `lorakit train CONFIG.yaml`?

    nice python benchmarks/memory_process.py            # SmolLM2-135M-Instruct, six configs (minutes)
    python benchmarks/memory_process.py --tiny          # a random-init tiny Llama folder (smoke test)

Each configuration is a real training config file (packed plain-text data, so every sequence holds exactly
max_seq_len tokens, the shape the estimate assumes); `lorakit train` runs it in its own process for a few
steps and the process's max RSS is read from the kernel (wait4's ru_maxrss). The prediction is
`lorakit estimate CONFIG.yaml --json`'s process_peak_bytes, computed before and apart from the run.
error = predicted / measured - 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
HEADER = (f"{'method':<6} {'ckpt':<4} {'batch x seq':>11} {'measured MB':>11} {'predicted MB':>12} {'error':>7} "
          f"{'baseline':>8} {'load':>6} {'train':>6} {'seconds':>7}")


@dataclass(frozen=True)
class Config:
    """One measured run."""

    quantize: str | None  # None = LoRA, "nf4" = QLoRA
    checkpointing: bool
    batch: int
    seq: int

    @property
    def method(self) -> str:
        return "lora" if self.quantize is None else "qlora"


FULL = (
    Config(None, False, 2, 128),
    Config("nf4", False, 2, 128),
    Config(None, True, 8, 256),
    Config("nf4", True, 8, 256),
    Config(None, False, 8, 256),
    Config("nf4", False, 8, 256),
)
TINY = (Config(None, False, 2, 64), Config("nf4", True, 2, 64))


def text_data(path: Path, seq: int, examples: int) -> Path:
    """Plain-text examples longer than `seq` tokens (seeded word salad), so packing cuts each to exactly `seq`."""
    rng = random.Random(0)
    words = ["date", "model", "adapter", "train", "memory", "token", "layer", "weight", "rank", "learn", "the",
             "a", "of", "to", "and", "value", "matrix", "update", "loss", "step"]
    with path.open("w") as handle:
        for _ in range(examples):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2 * seq))}) + "\n")
    return path


def write_config(folder: Path, config: Config, model: str, steps: int) -> Path:
    """The run's YAML: packed data, the config's switches, a few steps, no evaluation or TensorBoard."""
    data = text_data(folder / "data.jsonl", config.seq, examples=config.batch * (steps + 1))
    settings = {"model": model, "quantize": config.quantize, "train_file": str(data), "output_dir": str(folder / "run"),
                "max_seq_len": config.seq, "packing": True, "batch_size": config.batch, "max_steps": steps,
                "gradient_checkpointing": config.checkpointing, "tensorboard": False, "save_every": 10**6,
                "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def max_rss_of(argv: list[str], env: dict[str, str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of one command, read from the kernel when it exits."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.read()}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def predict(config_path: Path, env: dict[str, str]) -> dict:
    """`lorakit estimate CONFIG --json`, run as a user would."""
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "estimate", str(config_path), "--json"], env=env,
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def tiny_model_folder(root: Path) -> str:
    """A random-init 2-layer Llama folder with the SmolLM2 tokenizer (tests/helpers.py builds it)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_tiny_model_folder

    return str(build_tiny_model_folder(root / "tiny"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama (smoke test)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (default: 4)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    lines = [HEADER, "-" * len(HEADER)]
    with tempfile.TemporaryDirectory(prefix="lorakit-memproc-") as tmp:
        root = Path(tmp)
        model = tiny_model_folder(root) if args.tiny else "smollm2-135m-instruct"
        for index, config in enumerate(TINY if args.tiny else FULL):
            folder = root / f"run{index}"
            folder.mkdir()
            config_path = write_config(folder, config, model, args.steps)
            estimate = predict(config_path, env)
            measured, seconds = max_rss_of([sys.executable, "-m", "lorakit.cli", "train", str(config_path),
                                            "--quiet"], env)
            predicted = estimate["process_peak_bytes"]
            line = (f"{config.method:<6} {'yes' if config.checkpointing else 'no':<4} "
                    f"{f'{config.batch} x {config.seq}':>11} {measured / 1e6:11.0f} {predicted / 1e6:12.0f} "
                    f"{100 * (predicted / measured - 1):+6.1f}% {estimate['runtime_baseline_bytes'] / 1e6:8.0f} "
                    f"{estimate['load_peak_bytes'] / 1e6:6.0f} {estimate['train_peak_bytes'] / 1e6:6.0f} "
                    f"{seconds:7.0f}")
            lines.append(line)
            print(line, flush=True)
    print(f"\nPredicted (`lorakit estimate CONFIG --json`: process_peak_bytes) vs measured max RSS of `lorakit "
          f"train CONFIG`, {'tiny random-init Llama' if args.tiny else 'SmolLM2-135M-Instruct'}, r=16 all-linear, "
          f"AdamW, bf16, packed data, {args.steps} steps; {platform.machine()} CPU, torch {torch.__version__}. "
          "MB = 1e6 bytes; baseline/load/train: the estimate's own terms.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
