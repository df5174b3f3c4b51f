"""The OpenAI API's request and response shapes that `lorakit serve` speaks, and its error body.

Field names and defaults follow the OpenAI API (and vLLM where it extends it): `max_tokens` (or
`max_completion_tokens`), `temperature` (default 1), `top_p`, `seed`, `stop`, `n`, `stream`. lorakit's one
extension is `adapters`: a {name: weight} blend of loaded adapters.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # n per request: each choice is a sequence in the batch


class ApiError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")  # clients send fields this server does not use (user, logprobs...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    adapters: dict[str, float] | None = Field(None, min_length=1)  # lorakit: a blend of loaded adapters

    def stops(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # the completions API's default


class Message(BaseModel):
    """One chat message; content as a string or as text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def chat(self) -> list[dict[str, str]]:
        """The messages as the tokenizer's chat template takes them."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's names)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's names)."""

    lora_name: str = Field(min_length=1)


def new_id(prefix: str) -> str:
    """A response id such as chatcmpl-1f3a..."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, parent: str | None, created: int) -> dict[str, Any]:
    """One entry of GET /v1/models; an adapter's parent is the base model's id (as vLLM lists LoRA modules)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": parent or name,
            "parent": parent}


def now() -> int:
    """Seconds since the epoch, as `created` fields hold."""
    return int(time.time())
