"""Routing without training (`"model": "auto"`): does the engine pick the right adapter from the prompt alone?

    nice python benchmarks/routing.py                 # trains 3 adapters on SmolLM2 (QLoRA), then routes (minutes)
    python benchmarks/routing.py --tiny               # random-init tiny Llama, a few steps (smoke test)

Three adapters, trained like the demo's (QLoRA, NF4 base, r=16 on all linear layers), on distinct tasks: the
demo's dates, numbers in words to digits, and CamelCase to snake_case (`lorakit/train/tasks.py`). A mixed
held-out set (--heldout per task, inputs no training example has) runs through the engine three ways: each
prompt with its own task's adapter (chosen by hand), with the adapter the router picks from the prompt
(`lorakit/serve/router.py`, what `"model": "auto"` does), and on the base. Reported: how often the router
picks the prompt's own adapter, and the exact match of each way, per task and overall.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

TASKS = ("dates", "numbers", "snake")


def splits(task: str, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples of a task."""
    from lorakit.train import demo_task, tasks

    if task == "dates":
        train, in_dist, _ = demo_task.make_splits(n_train, n_heldout, seed=0, n_ood=0)
        return train, in_dist
    return (tasks.number_splits if task == "numbers" else tasks.snake_splits)(n_train, n_heldout)


def train_adapters(workdir: Path, model: str, steps: int, n_heldout: int, tiny: bool) -> tuple[dict, dict]:
    """Train one adapter per task; ({task: adapter folder}, {task: held-out examples})."""
    from dataclasses import replace

    from lorakit.train import demo_task
    from lorakit.train.demo import demo_config
    from lorakit.train.trainer import train

    adapters, heldout = {}, {}
    for task in TASKS:
        train_examples, heldout[task] = splits(task, 2000, n_heldout)
        demo_task.write_jsonl(train_examples, workdir / task / "data" / "train.jsonl")
        cfg = replace(demo_config(workdir / task, steps, 4 if tiny else 16), model=model,
                      quantize=None if tiny else "nf4", tensorboard=False)
        done = Path(cfg.output_dir) / "adapter"
        if (done / "adapter_model.safetensors").is_file():  # --workdir kept them from an earlier run
            adapters[task] = str(done)
            continue
        started = time.perf_counter()
        adapters[task] = train(cfg, overwrite=True, progress=False)["adapter_dir"]
        print(f"trained {task} ({time.perf_counter() - started:.0f} s)", flush=True)
    return adapters, heldout


def evaluate(model_name: str, adapters: dict, heldout: dict, tiny: bool) -> dict:
    """Route every held-out prompt, then generate with the hand-picked, the routed and no adapter."""
    from lorakit.models import load_model
    from lorakit.serve.engine import Engine
    from lorakit.serve.router import Router
    from lorakit.train import tasks
    from lorakit.train.data import render_chat
    from lorakit.train.evaluate import exact_match, prompt_messages, reference_answer

    model, tokenizer = load_model(model_name, quantize=None if tiny else "nf4", dtype=torch.bfloat16)
    examples = [(task, e) for task in TASKS for e in heldout[task]]
    prompts = [render_chat(tokenizer, prompt_messages(e), add_generation_prompt=True) for _, e in examples]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    engine = Engine(model, tokenizer, max_loras=len(TASKS), max_cpu_loras=len(TASKS), max_batch=64,
                    max_model_len=longest + tasks.MAX_NEW_TOKENS)
    for task, folder in adapters.items():
        engine.add_adapter(task, folder)
    router, started = Router(), time.perf_counter()
    with torch.inference_mode():
        routed = [router.choose(engine, engine.encode(p))[0] for p in prompts]
    route_seconds = (time.perf_counter() - started) / len(prompts)
    ways = {"by hand": [task for task, _ in examples], "auto": routed, "base": [None] * len(prompts)}
    answers = {way: [r.text for r in engine.generate(prompts, picks, max_new_tokens=tasks.MAX_NEW_TOKENS)]
               for way, picks in ways.items()}
    rows = {}
    for task in (*TASKS, "all"):
        index = [i for i, (t, _) in enumerate(examples) if task in ("all", t)]
        right = sum(routed[i] == examples[i][0] for i in index)
        rows[task] = {"examples": len(index), "routed_right": right / len(index)}
        for way in ways:
            hits = sum(exact_match(answers[way][i], reference_answer(examples[i][1])) for i in index)
            rows[task][way] = hits / len(index)
    return {"rows": rows, "route_ms_per_prompt": route_seconds * 1e3,
            "confusion": {t: {p: sum(1 for (tt, _), r in zip(examples, routed) if tt == t and r == p) for p in TASKS}
                          for t in TASKS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama, a few steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per adapter (default 120; tiny 3)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out examples per task (default 50; tiny 4)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--workdir", default=None, help="keep the trained adapters here (and reuse them next time)")
    args = parser.parse_args()
    steps, n_heldout = args.steps or (3 if args.tiny else 120), args.heldout or (4 if args.tiny else 50)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from helpers import build_tiny_model_folder

            model = str(build_tiny_model_folder(workdir / "model"))
        else:
            from lorakit.constants import DEFAULT_MODEL as model
        adapters, heldout = train_adapters(workdir, model, steps, n_heldout, args.tiny)
        result = evaluate(model, adapters, heldout, args.tiny)
    print(f"\nRouting among {len(TASKS)} adapters ({', '.join(TASKS)}), {n_heldout} held-out prompts per task; "
          f"{result['route_ms_per_prompt']:.1f} ms per prompt to route")
    header = f"{'task':<8} {'routed right':>12} {'exact match: by hand':>20} {'auto':>6} {'base':>6}"
    print(header + "\n" + "-" * len(header))
    for task, row in result["rows"].items():
        print(f"{task:<8} {row['routed_right']:12.2f} {row['by hand']:20.2f} {row['auto']:6.2f} {row['base']:6.2f}")
    print("routed to (rows: the prompt's task): " + json.dumps(result["confusion"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
