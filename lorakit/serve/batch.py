"""A JSONL file of requests through the engine: `lorakit generate --requests FILE`.

Each line is one request: {"prompt": "..."} or {"messages": [...]}, and optionally "adapter" (a name, null for
the base model, or a {name: weight} blend), "max_new_tokens", "temperature", "top_p", "seed", "stop" and an
"id" that is copied to the result. Each result line holds id, adapter, text, finish_reason, prompt_tokens,
completion_tokens, in the order of the requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorakit.errors import LorakitError
from lorakit.serve.engine import Engine

PARAMS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")
KEYS = ("id", "prompt", "messages", "adapter", *PARAMS)


def read_requests(path: str | Path) -> list[dict[str, Any]]:
    """The requests of a JSONL file, each checked for its shape (file:line in every error)."""
    file = Path(path)
    try:
        lines = file.read_bytes().decode("utf-8").splitlines()
    except OSError as exc:
        raise LorakitError(f"{file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise LorakitError(f"{file}: not UTF-8 text; save the requests as UTF-8 JSONL") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            requests.append(_check(json_line(file, number, line), f"{file}:{number}"))
    if not requests:
        raise LorakitError(f"{file}: no requests; write one JSON object per line with a prompt or messages")
    return requests


def json_line(file: Path, number: int, line: str) -> Any:
    """One parsed line, or a one-line error naming it."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{file}:{number}: not valid JSON ({exc.msg})") from None


def _check(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise LorakitError(f"{where}: expected a JSON object, got {type(item).__name__}")
    unknown = [key for key in item if key not in KEYS]
    if unknown:
        raise LorakitError(f"{where}: unknown key {unknown[0]!r}; a request may have {', '.join(KEYS)}")
    if ("prompt" in item) == ("messages" in item):
        raise LorakitError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" (a chat)")
    if "prompt" in item and not isinstance(item["prompt"], str):
        raise LorakitError(f"{where}: \"prompt\" must be a string")
    if "messages" in item and not (isinstance(item["messages"], list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in item["messages"])):
        raise LorakitError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    new_tokens = item.get("max_new_tokens", 1)
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        raise LorakitError(f"{where}: \"max_new_tokens\" must be a positive integer, got {new_tokens!r}")
    return item


def run_requests(engine: Engine, requests: list[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
    """Submit every request (a bad one fails before any runs), step to the end; results in request order."""
    submitted = []
    for index, item in enumerate(requests):
        try:
            submitted.append(engine.submit(item.get("prompt", item.get("messages")), item.get("adapter"),
                                           **{key: item[key] for key in PARAMS if key in item}))
        except LorakitError as exc:
            engine.waiting.clear()
            raise LorakitError(f"request {index + 1}: {exc}") from None
    with tqdm(total=len(submitted), desc="generate", unit="request", disable=not progress) as bar:
        while not all(r.done for r in submitted):
            engine.step()
            bar.update(sum(r.done for r in submitted) - bar.n)
    return [{"id": item.get("id", index), "adapter": item.get("adapter"), "text": r.text,
             "finish_reason": r.finish_reason, "prompt_tokens": len(r.prompt_ids),
             "completion_tokens": len(r.output_ids)}
            for index, (item, r) in enumerate(zip(requests, submitted))]
