"""A soak test of `lorakit serve` on 127.0.0.1: 16 streaming clients over 8 adapters for 60 s, adapters loaded and
unloaded meanwhile; no 5xx, every answer equal to its request run alone, resident memory bounded."""

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import Served, build_tiny_model_folder, make_adapter

import lorakit as lk
from lorakit.serve.engine import Engine

CLIENTS, ADAPTERS, SECONDS = 16, 8, 60
PROMPTS = ["Once upon a time", "The date is", "hello there", "What is 2 + 2?"]
LENGTHS = (3, 9, 17)
RSS_GROWTH_MB = 150  # the tiny model's server holds ~1 GB; a leak per request would pass this in a minute


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def stream_text(url: str, body: dict) -> tuple[int, str]:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, response.text
        text = ""
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[len("data: "):])["choices"][0]["text"]
    return 200, text


@pytest.mark.slow
def test_soak(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "model")
    names = [f"a{i}" for i in range(ADAPTERS)] + ["extra"]
    paths = {name: make_adapter(folder, tmp_path, name, 2 + 2 * (i % 4), i) for i, name in enumerate(names)}
    model, tokenizer = lk.load_model(str(folder))
    engine = Engine(model, tokenizer, max_model_len=256)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    expected = {(p, a, n): engine.generate([p], [a], max_new_tokens=n)[0].text
                for p in PROMPTS for a in names for n in LENGTHS}
    served = Served(folder, {name: paths[name] for name in names[:ADAPTERS]}, "--max-loras", "4",
                    "--max-cpu-loras", "6", "--max-batch", "8")
    failures, counts, lock = [], {"done": 0, "loads": 0}, threading.Lock()
    stop_at = time.time() + SECONDS

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.time() < stop_at:
            key = (rng.choice(PROMPTS), f"a{rng.randrange(ADAPTERS)}", rng.choice(LENGTHS))
            status, text = stream_text(served.url, {"model": key[1], "prompt": key[0], "max_tokens": key[2],
                                                    "temperature": 0})
            with lock:
                if status != 200 or text != expected[key]:
                    failures.append((key, status, text))
                counts["done"] += 1

    def loader() -> None:
        while time.time() < stop_at:
            load = httpx.post(f"{served.url}/v1/load_lora_adapter", timeout=120,
                              json={"lora_name": "extra", "lora_path": str(paths["extra"])})
            status, text = stream_text(served.url, {"model": "extra", "prompt": PROMPTS[0], "max_tokens": 9,
                                                    "temperature": 0})
            unload = httpx.post(f"{served.url}/v1/unload_lora_adapter", json={"lora_name": "extra"}, timeout=120)
            with lock:
                if (load.status_code, status, unload.status_code) != (200, 200, 200) or \
                        text != expected[(PROMPTS[0], "extra", 9)]:
                    failures.append(("loader", load.status_code, status, unload.status_code, text))
                counts["loads"] += 1

    try:
        stream_text(served.url, {"model": "a0", "prompt": "warm up", "max_tokens": 2})
        start_rss = rss_mb(served.proc.pid)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=loader))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        growth = rss_mb(served.proc.pid) - start_rss
    finally:
        assert served.stop() == 0
    assert not failures, failures[:5]
    assert counts["done"] >= CLIENTS * 5 and counts["loads"] >= 5, counts
    assert growth < RSS_GROWTH_MB, f"resident memory grew {growth:.0f} MB over {counts['done']} requests"
