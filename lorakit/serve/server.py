"""`lorakit serve`: an OpenAI-compatible HTTP server over the engine (FastAPI on uvicorn).

One thread owns the engine (`Worker`): it steps while requests are queued or running and, between steps, runs
what the HTTP handlers hand it (submit, cancel, load, unload), so only that thread ever touches the engine.
`lorakit serve` runs the engine on the main thread and uvicorn on another: PyTorch's CPU ops parallelise through
OpenMP, whose thread team belongs to the thread that starts it, and a second team beside the main one
oversubscribes the cores, which makes every op wait for its workers to wake (a decoding step ran 2-3x slower).
An app from `create_app` runs the engine on a thread of its own instead. Each sequence's new tokens go back to
its handler through an asyncio queue; a streaming handler turns them into server-sent events as they come, and a
client that goes away cancels its sequences at once. The queue of waiting requests is bounded: past `max_queue`
a request gets 429.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError, UnknownAdapter
from lorakit.serve.engine import Engine, Request
from lorakit.serve.metrics import Metrics
from lorakit.serve.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    model_card,
    new_id,
    now,
    usage,
)
from lorakit.serve.router import Router

AUTO = "auto"  # the model name that routes a request to the loaded adapter its prompt fits best


@dataclass
class Event:
    """What one engine step produced for one sequence."""

    tokens: list[int]
    finish_reason: str | None = None
    text: str | None = None  # the final text (cut at a stop string), once finished
    error: str | None = None


class Worker:
    """The engine on its own thread: handlers hand it calls; each sequence's tokens go to its sink."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sinks: dict[int, Callable[[Event], None]] = {}  # request id -> where its events go
        self.on_tokens: Callable[[int], None] = lambda count: None
        self._calls: deque = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start stepping on a thread of its own."""
        self._thread = threading.Thread(target=self.loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step (and wait for the thread, if it has one)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine's thread between steps; its result (or exception) in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    async def run(self, fn: Callable[[Engine], Any]) -> Any:
        """`call`, awaited."""
        return await asyncio.wrap_future(self.call(fn))

    def _busy(self) -> bool:
        return bool(self.engine.waiting or self.engine.running)

    def loop(self) -> None:
        """Step and run calls in this thread until `stop`."""
        while True:
            with self._wake:
                while not (self._calls or self._busy() or self._stopped):
                    self._wake.wait(timeout=0.5)  # a timeout keeps the main thread responsive to Ctrl-C
                if self._stopped:
                    return
                calls, self._calls = list(self._calls), deque()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as exc:  # the handler re-raises it on its side
                        future.set_exception(exc)
            if self._busy():
                self._step()

    def _step(self) -> None:
        try:
            moved = self.engine.step()
        except Exception as exc:  # a fault fails the requests in flight, not the server
            self._fail_all(f"{type(exc).__name__}: {exc}")
            return
        for request in moved:
            tokens, request.new_tokens = request.new_tokens, []
            self.on_tokens(len(tokens))
            sink = self.sinks.get(request.id)
            if sink is not None:
                sink(Event(tokens, request.finish_reason, request.text if request.done else None))
            if request.done:
                self.sinks.pop(request.id, None)

    def _fail_all(self, message: str) -> None:
        for request in [*self.engine.running, *self.engine.waiting]:
            self.engine.cancel(request)
            sink = self.sinks.pop(request.id, None)
            if sink is not None:
                sink(Event([], error=message))


class TextStream:
    """One choice's text as its tokens arrive: what is safe to send now, and what it adds."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0
        # The start of a stop string is held back: once the stop completes, it is not part of the text.
        self.hold = max((len(stop) for stop in stops), default=1) - 1

    def feed(self, event: Event) -> str:
        """The new text this event makes safe to send ("" when none)."""
        self.ids += event.tokens
        if event.text is not None:
            text = event.text
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")  # no half characters
            text = text[: max(len(text) - self.hold, 0)]
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta


@dataclass
class Job:
    """One HTTP request's sequences (n choices) and the queue their events arrive on."""

    requests: list[Request]
    queue: asyncio.Queue
    mix: dict[str, float]
    started: float


class Server:
    """The HTTP side: turns API requests into engine requests and engine events into API responses."""

    def __init__(self, engine: Engine, base_id: str, api_key: str | None = None, max_queue: int = 256) -> None:
        self.engine, self.base_id, self.api_key, self.max_queue = engine, base_id, api_key, max_queue
        self.worker = Worker(engine)
        self.metrics = Metrics(engine)
        self.worker.on_tokens = self.metrics.tokens.inc
        self.router = Router()
        self.created = now()

    # ------------------------------------------------------------------------------ requests

    def resolve(self, body: ChatRequest | CompletionRequest) -> str | dict[str, float] | None:
        """The engine's adapter argument for a request: the base, one adapter, a blend, or AUTO (routed)."""
        if body.adapters is not None:
            return dict(body.adapters)
        return None if body.model == self.base_id else body.model

    async def start(self, prompt: Any, body: ChatRequest | CompletionRequest, max_tokens: int | None) -> Job:
        """Submit the request's n sequences; their events arrive on the job's queue."""
        loop, queue, arrived = asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter()
        chosen = self.resolve(body)

        def submit(engine: Engine) -> tuple[list[Request], str | dict[str, float] | None]:
            if len(engine.waiting) >= self.max_queue:
                raise ApiError(429, f"the server's queue is full ({self.max_queue} waiting); retry shortly",
                               "rate_limit_error", headers={"Retry-After": "1"})
            made: list[Request] = []
            adapter = chosen
            try:
                if adapter == AUTO:
                    adapter, _ = self.router.choose(engine, engine.encode(prompt))
                for index in range(body.n):
                    seed = None if body.seed is None else body.seed + index
                    made.append(engine.submit(prompt, adapter, max_new_tokens=max_tokens, temperature=body.temperature,
                                              top_p=body.top_p, seed=seed, stop=body.stops()))
            except LorakitError as exc:
                for request in made:
                    engine.cancel(request)
                raise self.api_error(exc) from None
            for index, request in enumerate(made):
                self.worker.sinks[request.id] = lambda event, i=index: loop.call_soon_threadsafe(
                    queue.put_nowait, (i, event))
            return made, adapter

        requests, adapter = await self.worker.run(submit)
        mix = {adapter: 1.0} if isinstance(adapter, str) else dict(adapter or {})
        return Job(requests, queue, mix, arrived)

    def api_error(self, exc: LorakitError) -> ApiError:
        """An engine refusal as the API's error: an unknown adapter is a model that does not exist (404)."""
        if isinstance(exc, UnknownAdapter):
            loaded = ", ".join([self.base_id, *self.engine.cache.servable()])
            return ApiError(404, f"model {exc.name!r} does not exist; loaded: {loaded}", "invalid_request_error",
                            "model", "model_not_found")
        return ApiError(400, str(exc), "invalid_request_error")

    def cancel(self, job: Job) -> None:
        """Stop the job's unfinished sequences (its client went away); no waiting on the engine."""
        def stop(engine: Engine) -> None:
            for request in job.requests:
                self.worker.sinks.pop(request.id, None)
                engine.cancel(request)

        self.worker.call(stop)

    async def events(self, job: Job) -> AsyncIterator[tuple[int, Event]]:
        """The job's events until every sequence finished; the first token of each is timed."""
        pending, first = set(range(len(job.requests))), set()
        while pending:
            index, event = await job.queue.get()
            if event.error is not None:
                raise ApiError(500, f"generation failed: {event.error}", "server_error")
            if index not in first and (event.tokens or event.finish_reason):
                first.add(index)
                self.metrics.ttft.observe(time.perf_counter() - job.started)
            if event.finish_reason is not None:
                pending.discard(index)
            yield index, event

    async def complete(self, job: Job) -> list[tuple[str, str, int]]:
        """(text, finish_reason, completion tokens) of every choice, once all finished."""
        texts: dict[int, tuple[str, str, int]] = {}
        counts = [0] * len(job.requests)
        async for index, event in self.events(job):
            counts[index] += len(event.tokens)
            if event.finish_reason is not None:
                texts[index] = (event.text or "", finish(event.finish_reason), counts[index])
        return [texts[i] for i in range(len(job.requests))]

    # ------------------------------------------------------------------------------ responses

    def response(self, job: Job, body: Any, kind: str, choices: list[tuple[str, str, int]]) -> dict[str, Any]:
        """A whole (non-streamed) completion or chat completion."""
        prompt_tokens = len(job.requests[0].prompt_ids)
        if kind == "chat":
            items = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None} for i, (text, reason, _) in enumerate(choices)]
        else:
            items = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                     for i, (text, reason, _) in enumerate(choices)]
        return {"id": new_id("chatcmpl" if kind == "chat" else "cmpl"),
                "object": "chat.completion" if kind == "chat" else "text_completion", "created": now(),
                "model": body.model, "choices": items, "adapters": job.mix,
                "usage": usage(prompt_tokens, sum(count for _, _, count in choices))}

    async def stream(self, job: Job, body: Any, kind: str) -> AsyncIterator[str]:
        """Server-sent events: a chunk per new piece of text, a last one per choice with its finish_reason."""
        ident, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), now()
        streams = [TextStream(self.engine.tokenizer, body.stops()) for _ in job.requests]
        counts, finished = [0] * len(job.requests), 0

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            return sse({"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                        "created": created, "model": body.model, "choices": [choice], "adapters": job.mix})

        try:
            if kind == "chat":
                for index in range(len(job.requests)):
                    yield chunk(index, None, None, role=True)
            async for index, event in self.events(job):
                counts[index] += len(event.tokens)
                delta = streams[index].feed(event)
                reason = finish(event.finish_reason) if event.finish_reason else None
                finished += reason is not None
                if delta or reason:
                    yield chunk(index, delta, reason)
            if body.include_usage():
                yield sse({"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": created, "model": body.model, "choices": [],
                           "usage": usage(len(job.requests[0].prompt_ids), sum(counts))})
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            yield sse(exc.body())
        finally:
            if finished < len(job.requests):  # the client went away, or an error: free the sequences now
                self.cancel(job)


def finish(reason: str) -> str:
    """The engine's finish reason as the API's ("abort" only reaches a client that is gone)."""
    return reason if reason in ("stop", "length") else "stop"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, base_id: str, api_key: str | None = None, max_queue: int = 256):
    """The FastAPI application: OpenAI's endpoints, vLLM's adapter endpoints, /health and /metrics.

    Its lifespan runs the engine on a thread of its own, so any ASGI server can host it.
    """
    from lorakit.serve.routes import build_app

    return build_app(Server(engine, base_id, api_key, max_queue), engine_thread=True)


@asynccontextmanager
async def worker_running(server: Server, engine_thread: bool) -> AsyncIterator[None]:
    """The app's lifespan: with `engine_thread`, the engine's thread runs while the app does."""
    if engine_thread:
        server.worker.start()
    try:
        yield
    finally:
        if engine_thread:
            server.worker.stop()


def authorized(server: Server, header: str | None) -> bool:
    """True without an API key, or with `Authorization: Bearer <key>` (compared in constant time)."""
    if server.api_key is None:
        return True
    expected = f"Bearer {server.api_key}"
    return header is not None and hmac.compare_digest(header.encode(), expected.encode())


async def load_adapter(server: Server, body: LoadAdapterRequest) -> str:
    """Read the folder off the engine's thread (running requests keep stepping), then register it."""
    if body.lora_name == AUTO:
        raise ApiError(400, f"{AUTO!r} is the routing model's name; load the adapter under another name",
                       "invalid_request_error", "lora_name")
    try:
        adapter = await asyncio.to_thread(server.engine.read_adapter, body.lora_name, body.lora_path)
        await server.worker.run(lambda engine: engine.add_read_adapter(adapter))
    except LorakitError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", "lora_path") from None
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


async def unload_adapter(server: Server, body: UnloadAdapterRequest) -> str:
    """Refuse the adapter to new requests now; the running ones that use it finish first."""
    try:
        await server.worker.run(lambda engine: engine.remove_adapter(body.lora_name))
        server.router.forget(body.lora_name)
    except UnknownAdapter:
        raise ApiError(404, f"adapter {body.lora_name!r} is not loaded; loaded: "
                       f"{', '.join(server.engine.cache.servable()) or 'none'}", "invalid_request_error", "lora_name",
                       "model_not_found") from None
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def models(server: Server) -> dict[str, Any]:
    """GET /v1/models: the base, then every loaded adapter with the base as parent."""
    cards = [model_card(server.base_id, None, server.created), model_card(AUTO, server.base_id, server.created)]
    cards += [model_card(name, server.base_id, server.created) for name in server.engine.cache.servable()]
    return {"object": "list", "data": cards}


def banner(url: str, base_id: str, adapters: list[str], api_key: bool) -> str:
    """What `lorakit serve` prints once it listens: the URL and a curl example to paste."""
    model = adapters[0] if adapters else base_id
    auth = " -H 'Authorization: Bearer $KEY'" if api_key else ""
    example = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    return (f"lorakit serve: {url}/v1 (base {base_id}; adapters: {', '.join(adapters) or 'none'})\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{example}'\n"
            "  Ctrl-C stops it.")


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM stop the server."""
    # Set explicitly: a shell's background job inherits SIGINT ignored, and Python then installs no handler.
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def serve(engine: Engine, base_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 256, announce: Callable[[str], None] = print) -> None:
    """Run the server until Ctrl-C: uvicorn on a thread, the engine on this one; port 0 takes a free port."""
    import uvicorn

    from lorakit.serve.routes import build_app

    server = Server(engine, base_id, api_key, max_queue)
    app = build_app(server, engine_thread=False)

    class Announcing(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and self.servers:
                bound = self.servers[0].sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                announce(banner(f"http://{shown}:{bound[1]}", base_id, sorted(engine.cache.paths), bool(api_key)))

    http = Announcing(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    stop_on_signals()
    thread = threading.Thread(target=http.run, name="lorakit-http", daemon=True)  # no signal handlers off main
    thread.start()
    while not http.started and thread.is_alive():  # uvicorn ends its thread when it cannot bind
        time.sleep(0.05)
    if not http.started:
        raise LorakitError(f"cannot listen on {host}:{port} (the port is taken, or the address is not this "
                           "machine's); choose another --port or --host")
    try:
        server.worker.loop()  # until Ctrl-C: the normal way to stop
    except KeyboardInterrupt:
        pass
    http.should_exit = True  # uvicorn closes its connections and ends its lifespan
    thread.join(timeout=30)
    announce("lorakit serve: stopped")
