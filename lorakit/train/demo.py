"""`lorakit demo`: prove on the embedded model that QLoRA teaches it a task it could not do.

Steps: build the date-normalisation task (seeded), QLoRA fine-tune (NF4 base, r=16, all linear layers),
then measure held-out exact match of the base model and of the tuned one in one mixed batch through the
multi-adapter engine (half the requests without the adapter, half with it), show examples, write results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.constants import DEFAULT_MODEL, DEMO_ADAPTERS
from lorakit.errors import LorakitError
from lorakit.train import demo_task
from lorakit.train.config import TrainConfig
from lorakit.train.data import render_chat
from lorakit.train.evaluate import prompt_messages, reference_answer
from lorakit.train.trainer import train

DEMO_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
DEMO_LR = 1e-3
VERA_LR = 2e-2


def demo_adapter(adapter: str, steps: int) -> dict[str, Any]:
    """TrainConfig settings for `--adapter` (constants.DEMO_ADAPTERS), all on the NF4 base's linear layers."""
    if adapter not in DEMO_ADAPTERS:
        raise LorakitError(f"--adapter must be one of {', '.join(DEMO_ADAPTERS)}, got {adapter!r}")
    if adapter in ("lora", "dora"):
        return {"lora": {**DEMO_LORA, "use_dora": adapter == "dora"}}
    if adapter == "vera":
        # VeRA trains two scaling vectors per layer over frozen random projections: it wants a larger step.
        return {"adapter": "vera", "vera": {"r": 256, "target_modules": "all-linear"}, "learning_rate": VERA_LR}
    # AdaLoRA starts at rank 12 and prunes to an average of 8 between 10% and 80% of the run.
    schedule = {"tinit": steps // 10, "tfinal": steps // 5, "deltaT": max(1, steps // 24), "total_step": steps}
    return {"adapter": "adalora", "adalora": {"init_r": 12, "target_r": 8, "lora_alpha": 32,
                                              "target_modules": "all-linear", **schedule}}


def demo_config(out_dir: Path, steps: int, batch_size: int, adapter: str = "lora") -> TrainConfig:
    """The demo's training settings (NF4 base, all linear layers; LoRA r=16 unless `adapter` says otherwise)."""
    settings = dict(
        model=DEFAULT_MODEL, quantize="nf4", train_file=str(out_dir / "data" / "train.jsonl"),
        output_dir=str(out_dir / "train"), max_seq_len=96, batch_size=batch_size,
        max_steps=steps, learning_rate=DEMO_LR, warmup_ratio=0.05, lr_scheduler="cosine", weight_decay=0.0,
        eval_every=10**9, save_every=max(10, steps // 3), log_every=1, seed=0,
    )
    return TrainConfig(**{**settings, **demo_adapter(adapter, steps)})


def slice_accuracies(predictions: list[str], in_dist: list[dict],
                     ood: list[dict]) -> dict[str, tuple[float, list[str]]]:
    """{"in" | "ood" | "all": (exact match, predictions)} over the two held-out slices."""
    split = len(in_dist)
    scores = [demo_task.score(p, reference_answer(e)) for p, e in zip(predictions, in_dist + ood)]
    return {"all": (sum(scores) / max(1, len(scores)), predictions),
            "in": (sum(scores[:split]) / max(1, split), predictions[:split]),
            "ood": (sum(scores[split:]) / max(1, len(ood)), predictions[split:])}


def base_and_tuned_predictions(adapter_dir: str, examples: list[dict], max_new_tokens: int,
                               merged: bool = False) -> tuple[list, list]:
    """Greedy answers of the base and of base + adapter through the engine (a fresh NF4 base).

    A LoRA adapter runs in one mixed batch with the base. An adapter the batched engine cannot serve
    (`merged=True`: DoRA) is folded into a second copy of the base, as `lorakit merge` does.
    """
    from lorakit.inject import unload
    from lorakit.models import load_model
    from lorakit.peft_format import load_adapter
    from lorakit.serve.engine import Engine

    model, tokenizer = load_model(DEFAULT_MODEL, quantize="nf4", dtype=torch.bfloat16)
    prompts = [render_chat(tokenizer, prompt_messages(e), add_generation_prompt=True) for e in examples]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)

    def engine_for(base: torch.nn.Module) -> Engine:
        return Engine(base, tokenizer, max_loras=1, max_cpu_loras=1, max_batch=64,
                      max_model_len=longest + max_new_tokens)

    if merged:
        before = engine_for(model).generate(prompts, max_new_tokens=max_new_tokens)
        tuned = unload(load_adapter(load_model(DEFAULT_MODEL, quantize="nf4", dtype=torch.bfloat16)[0],
                                    adapter_dir), merge=True)
        after = engine_for(tuned).generate(prompts, max_new_tokens=max_new_tokens)
        return [r.text for r in before], [r.text for r in after]
    engine = engine_for(model)
    engine.add_adapter("dates", adapter_dir)
    results = engine.generate(prompts * 2, [None] * len(prompts) + ["dates"] * len(prompts),
                              max_new_tokens=max_new_tokens)
    texts = [r.text for r in results]
    return texts[: len(prompts)], texts[len(prompts):]


def run_demo(out: str | Path = "runs/demo", steps: int = 120, batch_size: int = 16, n_train: int = 2000,
             n_heldout: int = 100, overwrite: bool = False, progress: bool = True,
             say=print, adapter: str = "lora") -> dict[str, Any]:
    """Run the demo end to end and return (and write to OUT/results.json) its results."""
    started = time.time()
    settings = demo_adapter(adapter, steps)
    lora = settings.get(settings.get("adapter", "lora"))
    out_dir = Path(out)
    if (out_dir / "results.json").exists() and not overwrite:
        raise LorakitError(f"{out_dir} holds a finished demo; pass --overwrite or choose another --out")
    from lorakit.models import load_model

    say("loading SmolLM2-135M-Instruct and quantizing it to NF4 ...")
    model, tokenizer = load_model(DEFAULT_MODEL, quantize="nf4", dtype=torch.bfloat16)
    train_examples, in_dist, ood = demo_task.make_splits(n_train, n_heldout, seed=0)
    heldout = in_dist + ood
    demo_task.write_jsonl(train_examples, out_dir / "data" / "train.jsonl")
    demo_task.write_jsonl(in_dist, out_dir / "data" / "heldout.jsonl")
    demo_task.write_jsonl(ood, out_dir / "data" / "heldout_ood.jsonl")
    say(f"task: normalise free-form dates (1900-2099) to ISO 8601 ({n_train} train examples; held out: "
        f"{len(in_dist)} in-distribution, {len(ood)} with unseen years or spellings)")

    cfg = demo_config(out_dir, steps, batch_size, adapter)
    results = train(cfg, overwrite=True, model=model, tokenizer=tokenizer, progress=progress)
    del model  # the engine serves a fresh base with the adapter from its folder
    before, after = base_and_tuned_predictions(results["adapter_dir"], heldout, demo_task.MAX_NEW_TOKENS,
                                               merged=adapter != "lora")
    base, tuned = slice_accuracies(before, in_dist, ood), slice_accuracies(after, in_dist, ood)
    say(f"base model held-out exact match: {base['all'][0]:.2f} (unseen years/spellings {base['ood'][0]:.2f})")
    say(f"tuned model held-out exact match: {tuned['all'][0]:.2f} (unseen years/spellings {tuned['ood'][0]:.2f})")

    examples = []
    rows = list(zip(heldout, base["all"][1], tuned["all"][1]))
    for example, before, after in rows[:2] + rows[len(in_dist):len(in_dist) + 3]:
        examples.append({"input": prompt_messages(example)[-1]["content"], "expected": reference_answer(example),
                         "base": before, "tuned": after})
    for row in examples:
        say(f"  {row['input']!r:40}  base: {row['base']!r:24} tuned: {row['tuned']!r}  (expected {row['expected']})")

    summary = {
        "task": "date normalisation to ISO 8601 (exact match), 1900-2099, two-digit years by the %y rule",
        "base_accuracy": base["all"][0], "tuned_accuracy": tuned["all"][0],
        "base_accuracy_in_distribution": base["in"][0], "tuned_accuracy_in_distribution": tuned["in"][0],
        "base_accuracy_ood": base["ood"][0], "tuned_accuracy_ood": tuned["ood"][0],
        "heldout_examples": len(heldout), "heldout_ood_examples": len(ood),
        "heldout_years": sorted(demo_task.heldout_years(0)), "heldout_forms": list(demo_task.HELDOUT_FORMS),
        "train_examples": len(train_examples), "steps": results["steps"], "batch_size": batch_size,
        "train_seconds": results["train_seconds"], "total_seconds": round(time.time() - started, 1),
        "tokens_per_s": results["tokens_per_s"], "final_loss": results["final_loss"],
        "adapter_dir": results["adapter_dir"], "adapter_bytes": results["adapter_bytes"], "quant_type": "nf4",
        "adapter": adapter, "lora": lora, "trainable_params": results["trainable_params"],
        "total_params": results["total_params"],
        "examples": examples,
    }
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out_dir / "results.json")
    say(f"adapter: {results['adapter_dir']} ({results['adapter_bytes'] / 1e6:.1f} MB); "
        f"results: {out_dir / 'results.json'}; total {summary['total_seconds']:.0f} s")
    return summary
