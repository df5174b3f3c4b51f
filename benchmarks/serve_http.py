"""`lorakit serve` under open-loop load: throughput and latency against the request rate, over HTTP.

    nice python benchmarks/serve_http.py                       # SmolLM2-135M-Instruct bf16, 64 adapters (minutes)
    python benchmarks/serve_http.py --rates 1,2 --seconds 20 --plot latency.png
    python benchmarks/serve_http.py --tiny                     # random-init tiny Llama (CI smoke test)

The server runs as its own process (`python -m lorakit serve`, 127.0.0.1, a free port) with 64 adapters of
rank 8, 16, 24 and 32 in turn on all linear layers (written in PEFT format first, as benchmarks/serve.py
writes them). For each rate, requests arrive open-loop (Poisson arrivals at that rate for `--seconds`,
whether or not earlier ones finished), each a streamed completion of a ~100-token prompt for 32 tokens at
temperature 0, naming a random adapter. Per rate: completed requests, generated tokens/s over the window
from the first arrival to the last answer, time to first token (arrival to the first text chunk) and
inter-token latency (the mean gap between a request's tokens after the first), p50 and p99. The PNG plots
both latencies against the offered rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as offline  # noqa: E402  (benchmarks/serve.py: adapters, prompts, percentiles)

MAX_TOKENS = 32


def start_server(workdir: Path, adapters: int, tiny: bool) -> tuple[subprocess.Popen, str]:
    """`lorakit serve` over the workdir's base and adapters; returns the process and its URL."""
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(workdir / "model"), "--port", "0",
               "--max-loras", str(adapters), "--max-cpu-loras", str(adapters), "--max-lora-rank", "32",
               "--max-batch", "64", "--max-model-len", "512", "--max-queue", "1024"]
    command += [f"--adapter=a{i}={workdir / f'a{i}'}" for i in range(adapters)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = ""
    while "Ctrl-C" not in seen:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
        seen += line
    return proc, re.search(r"(http://[\d.]+:\d+)/v1", seen).group(1)


async def one_request(client, url: str, prompt: str, adapter: str, sent: float) -> dict:
    """A streamed completion; the arrival time, each text chunk's time, and the tokens generated."""
    body = {"model": adapter, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                chunks.append(time.perf_counter())
    return {"status": 200, "sent": sent, "chunks": chunks, "tokens": tokens, "done": time.perf_counter()}


async def run_rate(url: str, rate: float, seconds: float, prompts: list[str], adapters: int, seed: int) -> list:
    """Open-loop arrivals at `rate` per second for `seconds`; every request's record."""
    import httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks, start, at = [], time.perf_counter(), 0.0
        while at < seconds:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, url, rng.choice(prompts),
                                                         f"a{rng.randrange(adapters)}", time.perf_counter())))
            at += rng.expovariate(rate)
        return await asyncio.gather(*tasks)


def summarize(rate: float, records: list[dict]) -> dict:
    """Throughput and latency percentiles of one rate's requests."""
    done = [r for r in records if r["status"] == 200 and r["chunks"]]
    window = max(r["done"] for r in done) - min(r["sent"] for r in done) if done else float("nan")
    ttft = sorted(r["chunks"][0] - r["sent"] for r in done)
    itl = sorted((r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1)
    pick = lambda values, q: offline.percentile(values, q) if values else float("nan")  # noqa: E731
    return {"rate": rate, "requests": len(records), "completed": len(done),
            "errors": sum(r["status"] != 200 for r in records), "tokens_per_s": sum(r["tokens"] for r in done) / window,
            "ttft_p50": pick(ttft, 0.5), "ttft_p99": pick(ttft, 0.99), "itl_p50": pick(itl, 0.5),
            "itl_p99": pick(itl, 0.99)}


def format_table(rows: list[dict]) -> str:
    """One line per rate."""
    header = (f"{'rate req/s':>10} {'requests':>8} {'done':>5} {'errors':>6} {'tokens/s':>9} {'TTFT p50 s':>10} "
              f"{'TTFT p99 s':>10} {'ITL p50 ms':>10} {'ITL p99 ms':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['rate']:10.2f} {r['requests']:8d} {r['completed']:5d} {r['errors']:6d} "
                     f"{r['tokens_per_s']:9.1f} {r['ttft_p50']:10.2f} {r['ttft_p99']:10.2f} "
                     f"{r['itl_p50'] * 1e3:10.1f} {r['itl_p99'] * 1e3:10.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Time to first token and inter-token latency (p50, p99) against the offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, scale, unit in ((left, "ttft", 1, "s"), (right, "itl", 1e3, "ms")):
        for q in ("p50", "p99"):
            axis.plot(rates, [r[f"{key}_{q}"] * scale for r in rows], marker="o", label=q)
        axis.set_xlabel("offered load (requests/s)")
        axis.set_ylabel(f"{'time to first token' if key == 'ttft' else 'inter-token latency'} ({unit})")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random-init tiny Llama, short (smoke test)")
    parser.add_argument("--rates", default=None, help="comma-separated requests/s (default 0.5,1,2,4,8; tiny 2,8)")
    parser.add_argument("--seconds", type=float, default=None, help="arrival window per rate (default 30; tiny 3)")
    parser.add_argument("--adapters", type=int, default=None, help="adapters served (default 64; tiny 8)")
    parser.add_argument("--plot", default=None, help="write the latency-against-load PNG here")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rates = [float(r) for r in (args.rates or ("2,8" if args.tiny else "0.5,1,2,4,8")).split(",")]
    seconds = args.seconds or (3.0 if args.tiny else 30.0)
    adapters = args.adapters or (8 if args.tiny else 64)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([sys.executable, offline.__file__, "--prepare", "--workdir", str(workdir), "--scale-adapters",
                        "0"] + (["--tiny"] if args.tiny else []), check=True, capture_output=True)
        proc, url = start_server(workdir, adapters, args.tiny)
        try:
            texts = offline.prompts(offline.tokenizer_of(workdir), 32, 20 if args.tiny else 100)
            asyncio.run(run_rate(url, 4.0, 1.0, texts[:4], adapters, seed=99))  # warm-up: compiles, reads adapters
            rows = []
            for index, rate in enumerate(rates):
                rows.append(summarize(rate, asyncio.run(run_rate(url, rate, seconds, texts, adapters, seed=index))))
                print(f"rate {rate}: {rows[-1]['completed']}/{rows[-1]['requests']} done", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    model = "tiny random-init Llama" if args.tiny else "SmolLM2-135M-Instruct bf16"
    title = f"lorakit serve, {model}, {adapters} adapters, {MAX_TOKENS} new tokens"
    print(f"\n{title}; open-loop Poisson arrivals for {seconds:.0f} s per rate")
    print(format_table(rows))
    if args.plot:
        plot(rows, Path(args.plot), title)
        print(f"plot written to {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if any(r["errors"] or not r["completed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
