"""Does `lorakit.memory.estimate` predict real lorakit training steps? Predicted vs measured peak bytes.

    nice python benchmarks/memory_validation.py          # SmolLM2-135M-Instruct, six configs (minutes)
    python benchmarks/memory_validation.py --tiny        # random-init tiny Llama, seconds (CI smoke test)

Each configuration loads the model as lorakit does (`load_model(dtype=bfloat16[, quantize="nf4"])`), adds a
LoRA adapter (all-linear, alpha = 2r), and runs lorakit trainer's step: `causal_lm_loss(chunked=True)` under
bf16 autocast, backward, optimizer step, `zero_grad(set_to_none=True)`. One untracked warm-up step creates the
optimizer state; the next step runs under `PeakMemoryTracker`. Measured = bytes of every tensor held between
steps (weights, buffers, adapter, optimizer state) + the tracker's peak during the step. Predicted =
`estimate(...).total` with the same method, rank, targets, batch, seq_len, optimizer, checkpointing, bf16
compute, fp32 adapter, chunked CE (chunk 1024).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch
from train_step import lorakit_model, resident_bytes, token_batch, train_step

import lorakit as lk
from lorakit.memory import (
    ModelShape,
    PeakMemoryTracker,
    adapter_tensors,
    estimate,
    layer_activation_bytes,
    norm_activation_bytes,
)
from lorakit.optim import make_optimizer
from lorakit.train.trainer import causal_lm_loss

CE_CHUNK = 1024  # chunked_cross_entropy's default chunk
HEADER = (f"{'method':<6} {'optimizer':<10} {'ckpt':<4} {'batch x seq':>11} {'rank':>4} "
          f"{'measured MB':>11} {'predicted MB':>12} {'error':>7} {'fixed MB':>9} {'error':>7} "
          f"{'held MB':>8} {'step peak MB':>12}")


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


def predict(shape: ModelShape, config: Config):
    """estimate() with this configuration's settings (bf16 compute, fp32 adapter, chunked CE of 1024)."""
    return estimate(shape, method=config.method, rank=config.rank, targets="all-linear",
                    batch=config.batch, seq_len=config.seq, optimizer=config.optimizer,
                    gradient_checkpointing=config.checkpointing, compute_dtype=torch.bfloat16,
                    param_dtype=torch.float32, chunked_ce=True, ce_chunk=CE_CHUNK)


def corrected_total(shape: ModelShape, config: Config) -> float:
    """The estimate with the three corrections this benchmark found (docs/memory.md, validation section).

    1. Chunked CE holds one chunk's logits in fp32 plus in the compute dtype, (4 + s) V per token, not
       (4 + 2s) V; and lorakit.train.loss keeps the previous chunk alive while computing the next (the loop
       variable still holds it), so with more tokens than one chunk two chunks are alive.
    2. With a frozen norm weight, `weight * normalized` saves only the weight: each RMSNorm saves
       H (4 + s) + 4 bytes per token, not H (4 + 2s) + 4.
    3. The LoRA path saves A's output (r values per token and target) and compute-dtype copies of A and B.
    """
    est = predict(shape, config)
    s, tokens = 2, config.batch * config.seq
    targets = adapter_tensors(shape, config.rank, "all-linear")
    per_layer_adapter = sum(numel for _, numel in targets) / shape.layers
    per_layer_targets = len(targets) // (2 * shape.layers)
    layer = (layer_activation_bytes(shape, tokens, s) - 2 * tokens * shape.hidden * s
             + tokens * s * config.rank * per_layer_targets + s * per_layer_adapter)
    outside = norm_activation_bytes(shape, tokens, s) - tokens * shape.hidden * s + 8 * tokens
    if config.checkpointing:
        activations = shape.layers * tokens * shape.hidden * s + layer + outside
    else:
        activations = shape.layers * layer + outside
    live_chunks = 2 if tokens > CE_CHUNK else 1
    logits = live_chunks * min(CE_CHUNK, tokens) * shape.vocab * (4 + s) + 4 * tokens
    overlap = min(layer, logits) if config.checkpointing else 0.0
    held = est.weights + est.master_weights + est.adapter + est.optimizer
    return held + max(activations + logits - overlap, est.gradients)


def measure(config: Config, tiny: bool) -> tuple[int, int, ModelShape]:
    """(held bytes, step peak bytes, model shape) of one real lorakit training step."""
    model = lorakit_model(tiny, torch.bfloat16, "nf4" if config.method == "qlora" else None)
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=config.rank, lora_alpha=2 * config.rank,
                                        target_modules="all-linear"))
    if config.checkpointing:  # as lorakit's trainer enables it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = make_optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batch = token_batch(model.get_input_embeddings().num_embeddings, config.batch, config.seq)
    train_step(model, optimizer, loss_fn, batch)  # warm-up: creates the optimizer state
    held = resident_bytes(model, optimizer)
    with PeakMemoryTracker() as tracker:
        train_step(model, optimizer, loss_fn, batch)
    return held, tracker.peak_bytes, ModelShape.from_hf_config(model.config.to_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama (smoke test)")
    args = parser.parse_args()
    lines = [HEADER, "-" * len(HEADER)]
    for config in TINY if args.tiny else FULL:
        start = time.perf_counter()
        held, step_peak, shape = measure(config, args.tiny)
        measured = held + step_peak
        predicted, fixed = predict(shape, config).total, corrected_total(shape, config)
        line = (f"{config.method:<6} {config.optimizer:<10} {'yes' if config.checkpointing else 'no':<4} "
                f"{f'{config.batch} x {config.seq}':>11} {config.rank:>4} {measured / 1e6:11.2f} "
                f"{predicted / 1e6:12.2f} {100 * (predicted / measured - 1):+6.1f}% {fixed / 1e6:9.2f} "
                f"{100 * (fixed / measured - 1):+6.1f}% {held / 1e6:8.2f} {step_peak / 1e6:12.2f}")
        lines.append(line)
        print(f"{line}   ({time.perf_counter() - start:.0f} s)", flush=True)
    model = "tiny random-init Llama" if args.tiny else "SmolLM2-135M-Instruct"
    print(f"\nPredicted vs measured peak tensor memory, {model}, LoRA all-linear, bf16 compute, fp32 "
          f"adapter, chunked CE; {platform.machine()} CPU, torch {torch.__version__}. "
          "error = predicted/measured - 1; fixed = estimate with the corrections in corrected_total()")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
