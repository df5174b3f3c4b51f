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


@pytest.mark.parametrize(("quantize", "bf16"), list(itertools.product(QUANTIZE[:2], BF16)))
def test_dora_trains_the_same_function_with_every_switch(tiny, quantize, bf16):
    """lora.use_dora: each checkpointing/fast-kernel variant trains B and m, and the loss curves agree."""
    losses = {}
    for checkpointing, fast in itertools.product(CHECKPOINTING, FAST_KERNELS):
        name = f"dora-{quantize}-{bf16}-{checkpointing}-{fast}"
        cfg = settings(tiny, quantize, bf16, "auto", checkpointing, name, fast)
        cfg["lora"] = {**cfg.get("lora", {}), "r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                       "use_dora": True}
        results = train(TrainConfig(**cfg), progress=False)
        saved = load_file(f"{results['adapter_dir']}/adapter_model.safetensors")
        magnitudes = [t for k, t in saved.items() if k.endswith("lora_magnitude_vector")]
        assert len(magnitudes) == 14, name
        assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k), f"{name}: B did not train"
        metrics = [line for line in (tiny["root"] / name / "metrics.jsonl").read_text().splitlines() if line]
        losses[(checkpointing, fast)] = [float(line.split('"loss": ')[1].split(",")[0]) for line in metrics]
    reference = losses[(False, False)]
    tolerance = 2e-2 if bf16 else 1e-4
    for variant, curve in losses.items():
        assert curve == pytest.approx(reference, rel=tolerance), (variant, curve, reference)


@pytest.mark.parametrize("quantize", QUANTIZE[:2])
@pytest.mark.parametrize("bf16", BF16)
def test_vera_and_adalora_train_from_the_config(tiny, quantize, bf16):
    """adapter: vera | adalora trains from its own mapping: the lambdas move, AdaLoRA prunes to target_r."""
    import json

    for kind, values in (("vera", {"r": 16, "target_modules": "all-linear"}),
                         ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1,
                                      "lora_alpha": 8, "target_modules": "all-linear"})):
        name = f"{kind}-{quantize}-{bf16}"
        cfg = {**settings(tiny, quantize, bf16, name=name), "adapter": kind, kind: values, "max_steps": 6}
        results = train(TrainConfig(**cfg), progress=False)
        assert results["steps"] == 6 and math.isfinite(results["final_loss"]), name
        folder = results["adapter_dir"]
        saved = load_file(f"{folder}/adapter_model.safetensors")
        written = json.loads(open(f"{folder}/adapter_config.json").read())
        assert written["peft_type"] == kind.upper(), name
        if kind == "vera":
            lambda_d = [t for k, t in saved.items() if k.endswith("vera_lambda_d")]
            assert len(lambda_d) == 14 and all((t - 0.1).abs().max() > 0 for t in lambda_d), name
        else:
            kept = [sum(flags) for flags in written["rank_pattern"].values()]
            assert len(kept) == 14 and sum(kept) / len(kept) == pytest.approx(2), (name, kept)
            assert {tuple(t.shape)[0] for k, t in saved.items() if k.endswith("lora_E")} <= {0, 1, 2, 3, 4}
