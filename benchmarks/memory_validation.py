"""Does `lorakit.memory.estimate` predict real lorakit training steps? Predicted vs measured peak bytes.

    nice python benchmarks/memory_validation.py          # SmolLM2-135M-Instruct, six configs (minutes)
    python benchmarks/memory_validation.py --tiny        # random-init tiny Llama, seconds (CI smoke test)

Each configuration loads the model as lorakit does (`load_model(dtype=bfloat16[, quantize="nf4"])`, which
switches the CPU to lorakit's plain attention for short sequences), adds a LoRA adapter (all-linear, alpha =
2r), and runs lorakit trainer's step: `causal_lm_loss(chunked=True)` under bf16 autocast, backward, optimizer
step, `zero_grad(set_to_none=True)`. One untracked warm-up step creates the optimizer state; the next step runs
under `PeakMemoryTracker` (so the loss runs its reference kernels, as on a GPU) inside `allocator_peak_bytes`.
Measured = bytes of every tensor held between steps (weights, buffers, adapter, optimizer state) + the
allocator's peak during the step; "tracker" = held + the tracker's peak, which misses temporaries allocated
inside a kernel (torch.logsumexp's). Predicted = `estimate(...).total` with the same method, rank, targets,
batch, seq_len, optimizer, checkpointing and attention kind, bf16 compute, fp32 adapter, chunked CE (chunk 1024).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch
from train_step import lorakit_model, resident_bytes, token_batch, train_step

import lorakit as lk
from lorakit.kernels.attention import NAME as LORAKIT_ATTENTION
from lorakit.memory import ModelShape, StepSettings, attention_kind, estimate
from lorakit.optim import make_optimizer
from lorakit.profiling import PeakMemoryTracker, allocator_peak_bytes
from lorakit.train.trainer import causal_lm_loss, enable_checkpointing

CE_CHUNK = 1024  # chunked_cross_entropy's default chunk
HEADER = (f"{'method':<6} {'optimizer':<10} {'ckpt':<4} {'batch x seq':>11} {'rank':>4} {'attention':<9} "
          f"{'measured MB':>11} {'predicted MB':>12} {'error':>7} {'tracker MB':>10} {'held MB':>8}")


@dataclass(frozen=True)
class Config:
    """One measured training setting."""

    method: str  # lora | qlora
    optimizer: str  # adamw | adamw8bit
    checkpointing: bool
    batch: int
    seq: int
    rank: int = 16


FULL = (
    Config("lora", "adamw", False, 2, 256),
    Config("lora", "adamw", True, 4, 256),
    Config("qlora", "adamw", False, 2, 256),
    Config("qlora", "adamw", True, 4, 512),  # 2048 tokens: the chunked loss runs two chunks of 1024
    Config("qlora", "adamw8bit", True, 2, 512),
    Config("qlora", "adamw8bit", False, 1, 512, rank=64),
)
TINY = (Config("lora", "adamw", False, 2, 64), Config("qlora", "adamw8bit", True, 2, 64))


def loss_fn(model, batch):
    """The loss lorakit's trainer computes (bf16 autocast, chunked cross-entropy)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return causal_lm_loss(model, batch, chunked=True)


def predict(shape: ModelShape, config: Config, attention: str):
    """estimate() with this configuration's settings (bf16 compute, fp32 adapter, chunked CE of 1024)."""
    settings = StepSettings(method=config.method, rank=config.rank, targets="all-linear", batch=config.batch,
                            seq_len=config.seq, optimizer=config.optimizer,
                            gradient_checkpointing=config.checkpointing, compute_dtype=torch.bfloat16,
                            param_dtype=torch.float32, chunked_ce=True, ce_chunk=CE_CHUNK, attention=attention)
    return estimate(shape, settings)


@dataclass(frozen=True)
class Measurement:
    """One real training step's memory, in bytes."""

    held: int  # tensors alive between steps
    allocator_peak: int  # the CPU allocator's peak during the step, beyond `held`
    tracker_peak: int  # PeakMemoryTracker's peak during the same step
    attention: str  # the attention kind lorakit ran ("plain" or "sdpa")
    shape: ModelShape


def measure(config: Config, tiny: bool) -> Measurement:
    """The memory of one real lorakit training step."""
    model = lorakit_model(tiny, torch.bfloat16, "nf4" if config.method == "qlora" else None)
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=config.rank, lora_alpha=2 * config.rank,
                                        target_modules="all-linear"))
    if config.checkpointing:  # as lorakit's trainer enables it
        enable_checkpointing(model)
    model.train()
    optimizer = make_optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batch = token_batch(model.get_input_embeddings().num_embeddings, config.batch, config.seq)
    train_step(model, optimizer, loss_fn, batch)  # warm-up: creates the optimizer state
    held = resident_bytes(model, optimizer)
    trackers = []

    def tracked_step():
        with PeakMemoryTracker() as tracker:
            train_step(model, optimizer, loss_fn, batch)
        trackers.append(tracker)

    allocator_peak = allocator_peak_bytes(tracked_step)
    uses_lorakit_attention = model.config._attn_implementation == LORAKIT_ATTENTION
    attention = attention_kind("cpu", config.seq) if uses_lorakit_attention else "sdpa"
    return Measurement(held, allocator_peak, trackers[0].peak_bytes, attention,
                       ModelShape.from_hf_config(model.config.to_dict()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama (smoke test)")
    args = parser.parse_args()
    lines = [HEADER, "-" * len(HEADER)]
    for config in TINY if args.tiny else FULL:
        start = time.perf_counter()
        result = measure(config, args.tiny)
        measured = result.held + result.allocator_peak
        predicted = predict(result.shape, config, result.attention).total
        line = (f"{config.method:<6} {config.optimizer:<10} {'yes' if config.checkpointing else 'no':<4} "
                f"{f'{config.batch} x {config.seq}':>11} {config.rank:>4} {result.attention:<9} "
                f"{measured / 1e6:11.2f} {predicted / 1e6:12.2f} {100 * (predicted / measured - 1):+6.1f}% "
                f"{(result.held + result.tracker_peak) / 1e6:10.2f} {result.held / 1e6:8.2f}")
        lines.append(line)
        print(f"{line}   ({time.perf_counter() - start:.0f} s)", flush=True)
    model = "tiny random-init Llama" if args.tiny else "SmolLM2-135M-Instruct"
    print(f"\nPredicted vs measured peak tensor memory, {model}, LoRA all-linear, bf16 compute, fp32 "
          f"adapter, chunked CE; {platform.machine()} CPU, torch {torch.__version__}. "
          "measured = held + CPU allocator peak; error = predicted/measured - 1; tracker = held + "
          "PeakMemoryTracker peak (blind to temporaries inside kernels)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
