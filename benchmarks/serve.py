"""Many adapters at once: lorakit's engine vs PEFT's mixed batch and PEFT one adapter at a time.

    nice python benchmarks/serve.py                     # SmolLM2-135M-Instruct bf16, 64 requests, 3 rounds
    python benchmarks/serve.py --rows lorakit-64,peft-mixed-64 --json serve.json
    python benchmarks/serve.py --tiny                   # random-init tiny Llama, a few requests (CI smoke test)

64 requests of ~100-token prompts, 64 new tokens each, greedy; adapters of rank 8, 16, 24 and 32 (in turn) on
all linear layers, random factors, written to disk in PEFT format first. Rows, each in its own process, run one
after another in rounds (every row once per round), so a row and the rows it is compared with run minutes apart,
not a whole run apart; a ratio is taken within each round and the table gives its median over the rounds, and
each row's median tokens/s. `lorakit-N`: the engine with N distinct adapters over the 64 requests (request i
takes adapter i mod N); `lorakit-merged` the engine on the base with adapter 0 merged in (no adapter work: the
ceiling); `peft-mixed-64` PEFT's mixed batch (`generate(adapter_names=...)`, one batch); `peft-sequential-64`
PEFT one adapter at a time (`set_adapter`, then one batched `generate` per adapter's requests); `peft-1` PEFT's
`generate` on the whole batch with one adapter. tokens/s = generated tokens (up to each end of sequence) over
the wall time from the first submit to the last token; time to first token per request from that start; "peak
RSS MB" the row process's `ru_maxrss`, model loading included. The `scale` row writes 1,000 small adapters (r=4
on q_proj and v_proj) and serves 256 requests (16 new tokens) each naming a random one, with max_loras=16 and
max_cpu_loras=64, and reports the most adapters ever held in memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = ("lorakit-1", "lorakit-8", "lorakit-64", "lorakit-merged", "peft-mixed-64", "peft-sequential-64", "peft-1",
        "scale")
RANKS = (8, 16, 24, 32)
TAG = "ROW_RESULT "


def base_model(tiny: bool, folder: Path):
    """The base in bf16, loaded by transformers (from the workdir's copy)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True).eval()


def prepare(workdir: Path, tiny: bool, adapters: int, scale_adapters: int) -> None:
    """The base model folder, its adapters in PEFT format and the 1,000 small ones, written once."""
    import lorakit as lk

    folder = workdir / "model"
    if tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import build_tiny_model_folder

        build_tiny_model_folder(folder)
    else:
        from lorakit.models import convert_gguf, embedded_gguf_path

        folder.symlink_to(convert_gguf(embedded_gguf_path()))
    for index in range(adapters):
        write_adapter(lk, folder, workdir / f"a{index}", RANKS[index % len(RANKS)], "all-linear", seed=index)
    for index in range(scale_adapters):
        write_adapter(lk, folder, workdir / "many" / f"s{index}", 4, ["q_proj", "v_proj"], seed=10_000 + index)


_MODELS: dict = {}


def write_adapter(lk, folder: Path, out: Path, rank: int, targets, seed: int) -> None:
    """A random adapter (B nonzero, so it changes the output) saved in PEFT format."""
    key = (rank, str(targets))
    if key not in _MODELS:
        model = base_model(False, folder).float()
        lk.add_adapter(model, lk.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                            init_lora_weights=False))
        _MODELS[key] = model
    model = _MODELS[key]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    lk.save_adapter(model, out)


def prompts(tokenizer, count: int, length: int) -> list[str]:
    """`count` different prompts of about `length` tokens."""
    words = ("the quick brown fox jumps over the lazy dog while a date such as 3rd of March 2021 or 12/05/99 "
             "is written down by somebody who then asks what day it was and why it matters").split()
    texts = []
    for index in range(count):
        rng = random.Random(index)
        text = " ".join(rng.choice(words) for _ in range(length * 2))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        texts.append(tokenizer.decode(ids))
    return texts


def run_engine(engine, texts: list[str], adapters: list, new_tokens: int) -> dict:
    """Submit everything at once and step to the end; tokens/s and time to first token per request."""
    engine.generate(texts, adapters, max_new_tokens=3)  # warm-up: compiles the batch's shapes, reads the adapters
    start = time.perf_counter()
    requests = [engine.submit(text, adapter, max_new_tokens=new_tokens) for text, adapter in zip(texts, adapters)]
    first: dict[int, float] = {}
    most_in_memory, steps = 0, []
    while not all(r.done for r in requests):
        before = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - before)
        now = time.perf_counter() - start
        for r in requests:
            if r.id not in first and (r.output_ids or r.done):
                first[r.id] = now
        most_in_memory = max(most_in_memory, len(engine.cache.loaded))
    elapsed = time.perf_counter() - start
    used = {name for r in requests for name in r.mix}
    return {"seconds": elapsed, "tokens": sum(len(r.output_ids) for r in requests),
            "ttft": sorted(first.values()), "most_in_memory": most_in_memory,
            "decode_steps": len(steps) - 1, "decode_step_s": median(steps[1:]) if len(steps) > 1 else 0.0,
            "adapter_bytes": sum(engine.cache.loaded[n].nbytes for n in used if n in engine.cache.loaded)}


def lorakit_row(name: str, workdir: Path, tiny: bool, texts: list[str], new_tokens: int) -> dict:
    """The engine with N distinct adapters, the merged ceiling, or the 1,000-adapter scale run."""
    import lorakit as lk

    model = base_model(tiny, workdir / "model")
    if name == "scale":
        engine = lk.Engine(model, tokenizer_of(workdir), max_loras=16, max_cpu_loras=64, max_lora_rank=8,
                           max_batch=64, max_model_len=len_budget(texts, 16))
        names = sorted(p.name for p in (workdir / "many").iterdir())
        for adapter in names:
            engine.add_adapter(adapter, workdir / "many" / adapter)
        rng = random.Random(0)
        picks = [rng.choice(names) for _ in range(len(texts))]
        return run_engine(engine, texts, picks, 16) | {"adapters_on_disk": len(names)}
    if name == "lorakit-merged":
        model = lk.unload(lk.load_adapter(model, workdir / "a0"), merge=True)
    engine = lk.Engine(model, tokenizer_of(workdir), max_loras=64, max_cpu_loras=64, max_lora_rank=32,
                       max_batch=64, max_model_len=len_budget(texts, new_tokens))
    count = 0 if name == "lorakit-merged" else int(name.split("-")[1])
    for index in range(count):
        engine.add_adapter(f"a{index}", workdir / f"a{index}")
    adapters = [f"a{i % count}" if count else None for i in range(len(texts))]
    return run_engine(engine, texts, adapters, new_tokens)


def len_budget(texts: list[str], new_tokens: int) -> int:
    """A context long enough for the longest prompt plus its new tokens (chat-free, plain text)."""
    return 4 * max(len(t) for t in texts) // 3 + new_tokens + 64


def tokenizer_of(workdir: Path):
    """The base's tokenizer, padding on the left for batched generate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class FirstToken:
    """A logits processor that notes when generate first asks for a token (prefill done)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def peft_generate(model, tokenizer, texts: list[str], new_tokens: int, **kwargs) -> tuple[int, float]:
    """(generated tokens up to each end of sequence, time of the first token) of one batched generate."""
    from transformers import LogitsProcessorList

    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    first = FirstToken()
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         logits_processor=LogitsProcessorList([first]), **kwargs)
    tokens = 0
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        tokens += row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
    return tokens, first.at


def peft_row(name: str, workdir: Path, tiny: bool, texts: list[str], new_tokens: int) -> dict:
    """PEFT's mixed batch, one adapter at a time, or one adapter for the whole batch."""
    from peft import PeftModel

    tokenizer = tokenizer_of(workdir)
    count = 1 if name == "peft-1" else 64
    model = PeftModel.from_pretrained(base_model(tiny, workdir / "model"), workdir / "a0", adapter_name="a0")
    for index in range(1, count):
        model.load_adapter(workdir / f"a{index}", adapter_name=f"a{index}")
    model.eval()
    peft_generate(model, tokenizer, texts[:2], 2, **({"adapter_names": ["a0", "a0"]} if count > 1 else {}))
    start = time.perf_counter()
    tokens, ttft = 0, []
    if name == "peft-mixed-64":
        names = [f"a{i % count}" for i in range(len(texts))]
        tokens, at = peft_generate(model, tokenizer, texts, new_tokens, adapter_names=names)
        ttft = [at - start] * len(texts)
    else:
        groups: dict[str, list[str]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(f"a{i % count}", []).append(text)
        for adapter, group in groups.items():
            model.set_adapter(adapter)
            made, at = peft_generate(model, tokenizer, group, new_tokens)
            tokens += made
            ttft += [at - start] * len(group)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "ttft": sorted(ttft)}


def serve_row(name: str, args: argparse.Namespace) -> None:
    """Child process: run one row and print its result line."""
    workdir = Path(args.workdir)
    texts = prompts(tokenizer_of(workdir), args.scale_requests if name == "scale" else args.requests,
                    args.prompt_tokens)
    run = peft_row if name.startswith("peft") else lorakit_row
    with torch.inference_mode():
        result = run(name, workdir, args.tiny, texts, args.new_tokens)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(TAG + json.dumps(result), flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, nearest rank."""
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def median(values: list[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def speed(run: dict) -> float:
    """Generated tokens per second of one run of a row."""
    return run["tokens"] / run["seconds"]


def paired_ratio(rounds: dict[str, list[dict]], name: str, peer: str) -> float | None:
    """Median over rounds of name's tokens/s over peer's in the same round (None without both)."""
    pairs = [speed(a) / speed(b) for a, b in zip(rounds.get(name, []), rounds.get(peer, []))
             if "error" not in a and "error" not in b]
    return median(pairs) if pairs else None


def format_table(rounds: dict[str, list[dict]]) -> str:
    """Median tokens/s, paired ratios to peft-mixed-64 and lorakit-merged, TTFT of the median run, peak RSS."""
    header = (f"{'row':<20} {'tokens/s':>9} {'vs peft mixed':>13} {'vs merged':>9} {'TTFT p50 s':>10} "
              f"{'TTFT p99 s':>10} {'peak RSS MB':>11} {'tokens':>7} {'runs':>4}")
    lines = [header, "-" * len(header)]
    for name, runs in rounds.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            lines.append(f"{name:<20} failed: {runs[0]['error']}")
            continue
        middle = sorted(good, key=speed)[len(good) // 2]
        ratios = [paired_ratio(rounds, name, peer) for peer in ("peft-mixed-64", "lorakit-merged")]
        vs_peft, vs_merged = (f"{ratio:.2f}x" if ratio is not None else "-" for ratio in ratios)
        extra = f"  (held at most {middle['most_in_memory']} in memory)" if name == "scale" else ""
        lines.append(f"{name:<20} {median([speed(r) for r in good]):9.1f} {vs_peft:>13} {vs_merged:>9} "
                     f"{percentile(middle['ttft'], 0.5):10.2f} {percentile(middle['ttft'], 0.99):10.2f} "
                     f"{max(r['peak_rss_bytes'] for r in good) / 1e6:11.0f} {middle['tokens']:7d} {len(good):4d}"
                     f"{extra}")
    return "\n".join(lines)


def run_row(row: str, workdir: Path, common: list[str]) -> dict:
    """One run of a row in a fresh process: its result, or {"error": ...}."""
    command = [sys.executable, __file__, "--row", row, "--workdir", str(workdir)] + common
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    line = next((line for line in proc.stdout.splitlines() if line.startswith(TAG)), None)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    result = json.loads(line[len(TAG):]) if line else {"error": f"exit {proc.returncode}: {tail}"}
    return result | {"wall": time.perf_counter() - started}


def read_bandwidth() -> float:
    """Bytes per second this machine reads from memory: a max over 512 MB of bf16 (best of three)."""
    data = torch.ones(256 * 1024 * 1024, dtype=torch.bfloat16)
    data.view(-1, 1024).amax()
    best = min(timed(lambda: data.view(-1, 1024).amax()) for _ in range(3))
    return data.numel() * data.element_size() / best


def timed(fn) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bound_line(rounds: dict[str, list[dict]], bandwidth: float) -> str:
    """What memory traffic alone allows: each decoding step over 64 adapters reads all of them once."""
    multi, merged = rounds.get("lorakit-64", []), rounds.get("lorakit-merged", [])
    multi, merged = [r for r in multi if "error" not in r], [r for r in merged if "error" not in r]
    if not multi or not merged:
        return ""
    adapter_bytes = multi[0]["adapter_bytes"]
    floor = adapter_bytes / bandwidth
    step = median([r["decode_step_s"] for r in merged])
    seconds = median([r["seconds"] for r in merged])
    best = seconds / (seconds + multi[0]["decode_steps"] * floor)
    return (f"lorakit-64 reads {adapter_bytes / 1e6:.0f} MB of adapter factors (bf16, true ranks) per decoding step; "
            f"at this machine's {bandwidth / 1e9:.1f} GB/s that is >= {floor * 1e3:.1f} ms per step on top of merged's "
            f"{step * 1e3:.1f} ms (lorakit-64 measured {median([r['decode_step_s'] for r in multi]) * 1e3:.1f} ms): "
            f"at best {best:.2f}x merged over the whole run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama, few requests (smoke test)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--requests", type=int, default=None, help="requests per row (default 64; tiny 8)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 100; tiny 20)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 64; tiny 8)")
    parser.add_argument("--scale-adapters", type=int, default=None, help="adapters of the scale row (default 1000)")
    parser.add_argument("--scale-requests", type=int, default=None, help="requests of the scale row (default 256)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of every row but scale (default 3; tiny 1)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"requests": (8, 64), "prompt_tokens": (20, 100), "new_tokens": (8, 64), "scale_adapters": (20, 1000),
                "scale_requests": (16, 256)}
    for key, (tiny, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.rounds is None:
        args.rounds = 1 if args.tiny else 3
    if args.row:
        serve_row(args.row, args)
        return
    if args.prepare:
        prepare(Path(args.workdir), args.tiny, 64, args.scale_adapters)
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    bandwidth = read_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        common = sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in defaults), []) + (
            ["--tiny"] if args.tiny else [])
        # Written by a child: ru_maxrss survives fork and exec, so a large parent would inflate every row's peak.
        scale = [] if "scale" in rows else ["--scale-adapters", "0"]
        subprocess.run([sys.executable, __file__, "--prepare", "--workdir", str(workdir)] + common + scale, check=True,
                       capture_output=True)
        print(f"adapters written ({time.perf_counter() - started:.0f} s)", flush=True)
        results: dict[str, list[dict]] = {row: [] for row in rows}
        for round_index in range(args.rounds):
            for row in rows:
                if row == "scale" and round_index:
                    continue  # one run: it measures capacity, not a ratio
                results[row].append(run_row(row, workdir, common))
                print(f"round {round_index + 1}/{args.rounds} {row}: {results[row][-1].get('wall', 0):.0f} s",
                      flush=True)
    model = "tiny random-init Llama" if args.tiny else "SmolLM2-135M-Instruct bf16"
    print(f"\nServing, {model}, {args.requests} requests x ~{args.prompt_tokens} prompt tokens, {args.new_tokens} new "
          f"tokens, greedy, {args.rounds} round(s); {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(format_table(results))
    print(bound_line(results, bandwidth))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "read_bytes_per_s": bandwidth, "rows": results},
                                              indent=2))
    if any("error" in r for runs in results.values() for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
