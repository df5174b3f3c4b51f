"""Every combination of the trainer's main switches trains: quantize x bf16 x attention x checkpointing x fast kernels.

Within one (quantize, bf16) pair the twelve attention/checkpointing/fast-kernel variants compute the same function, so
their first losses must agree (to bf16 rounding in bf16), and their second losses too (after one
identical update): a path that trains but computes something else fails here, not only one that crashes.
"""

import itertools
import math

import pytest
import torch
from helpers import build_tiny_model_folder, tiny_train_config
from safetensors.torch import load_file

from lorakit.quant import Linear4bit
from lorakit.train.config import TrainConfig
from lorakit.train.demo_task import make_examples, write_jsonl
from lorakit.train.trainer import load_inputs, train

QUANTIZE = (None, "nf4", "fp4")
BF16 = (True, False)
ATTENTION = ("auto", "sdpa", "eager")
CHECKPOINTING = (False, True)
FAST_KERNELS = (True, False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("matrix")
    return {"model": build_tiny_model_folder(root / "model"), "root": root,
            "train": write_jsonl(make_examples(16, seed=3), root / "train.jsonl")}


def settings(tiny, quantize, bf16, attention="auto", checkpointing=False, name="run", fast=True) -> dict:
    return tiny_train_config(tiny["model"], tiny["train"], tiny["root"] / name, quantize=quantize, bf16=bf16,
                             attn_implementation=attention, gradient_checkpointing=checkpointing,
                             fast_kernels=fast, max_steps=2, warmup_ratio=0.0, lr_scheduler="constant")


@pytest.mark.parametrize(("quantize", "bf16"), list(itertools.product(QUANTIZE, BF16)))
def test_every_attention_and_checkpointing_variant_trains_the_same_function(tiny, quantize, bf16):
    losses = {}
    for attention, checkpointing, fast in itertools.product(ATTENTION, CHECKPOINTING, FAST_KERNELS):
        name = f"{quantize}-{bf16}-{attention}-{checkpointing}-{fast}"
        results = train(TrainConfig(**settings(tiny, quantize, bf16, attention, checkpointing, name, fast)),
                        progress=False)
        assert results["steps"] == 2 and math.isfinite(results["final_loss"]), name
        lora_B = [t for k, t in load_file(f"{results['adapter_dir']}/adapter_model.safetensors").items()
                  if "lora_B" in k]
        assert lora_B and all(t.abs().max() > 0 for t in lora_B), f"{name}: B is still zero, nothing trained"
        metrics = [line for line in (tiny["root"] / name / "metrics.jsonl").read_text().splitlines() if line]
        losses[(attention, checkpointing, fast)] = [float(line.split('"loss": ')[1].split(",")[0]) for line in metrics]
    reference = losses[("eager", False, False)]
    tolerance = 2e-2 if bf16 else 1e-4  # relative; bf16 rounds each product differently per kernel
    for variant, curve in losses.items():
        assert curve == pytest.approx(reference, rel=tolerance), (variant, curve, reference)


@pytest.mark.parametrize(("quantize", "bf16"), list(itertools.product(QUANTIZE, BF16)))
def test_the_trainer_holds_the_base_in_its_compute_dtype(tiny, quantize, bf16):
    """bf16 compute keeps a bf16 base (no fp32 copy); 4-bit layers compute in the same dtype."""
    cfg = TrainConfig(**settings(tiny, quantize, bf16))
    model, _, train_set, _, stats = load_inputs(cfg, None, None)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert {p.dtype for p in model.parameters()} == {dtype}
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if quantize is None:
        assert not quantized
    else:
        assert len(quantized) == 14 and {m.compute_dtype for m in quantized} == {dtype}
        assert {m.quant_type for m in quantized} == {quantize}
    assert train_set and stats["empty_answers"] == 0
