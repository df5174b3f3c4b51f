"""The HTTP routes of `lorakit serve` (FastAPI): OpenAI's endpoints with vLLM's adapter endpoints and errors.

Every error is OpenAI's body, {"error": {"message", "type", "param", "code"}}: malformed JSON and invalid
fields are 400 (`param` names the field), an unknown model 404, a full queue 429 with Retry-After, a
missing or wrong API key 401.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lorakit.serve import server as srv
from lorakit.serve.openai_api import ApiError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(exc: ApiError) -> JSONResponse:
    """The JSON response of an ApiError."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation failure (bad JSON, a wrong type or value) as a 400 naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                        "invalid_request_error")
    field = ".".join(location) or None
    return ApiError(400, f"{field or 'body'}: {first.get('msg', 'invalid value')}", "invalid_request_error", field)


async def _generate(server: srv.Server, body: ChatRequest | CompletionRequest, kind: str) -> Response:
    prompt: Any = body.chat() if kind == "chat" else body.prompt
    limit = (body.max_completion_tokens or body.max_tokens) if kind == "chat" else body.max_tokens
    job = await server.start(prompt, body, limit)
    if body.stream:
        return StreamingResponse(server.stream(job, body, kind), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        choices = await server.complete(job)
    except BaseException:
        server.cancel(job)
        raise
    return JSONResponse(server.response(job, body, kind, choices))


def build_app(server: srv.Server, engine_thread: bool) -> FastAPI:
    """The FastAPI app around a Server; `engine_thread`: its lifespan runs the engine on a thread of its own."""
    app = FastAPI(title="lorakit serve", lifespan=lambda app: srv.worker_running(server, engine_thread),
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path.startswith("/v1") and not srv.authorized(server, request.headers.get("authorization")):
            response: Response = error_response(ApiError(401, "missing or wrong API key: send 'Authorization: "
                                                              "Bearer <key>'", "authentication_error",
                                                         code="invalid_api_key"))
        else:
            response = await call_next(request)
        server.metrics.count(path, response.status_code)
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return srv.models(server)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await _generate(server, body, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Response:
        return await _generate(server, body, "chat")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(await srv.load_adapter(server, body))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(await srv.unload_adapter(server, body))

    return app
