"""Request and response bodies of the OpenAI-compatible API (the subset this server implements).

Requests follow OpenAI's field names and defaults. Fields OpenAI defines that this server cannot
honour (n > 1, logprobs, penalties, tools...) are rejected with a clear message rather than
ignored; unknown fields are ignored, as OpenAI clients may send newer ones. Extensions, passed
with the openai client's `extra_body`: `policy` (the selection policy for this request), `top_k`
and `ignore_eos`. Every response carries the request's measured memory report in `memory`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.report import GenerationReport


#: Tokens a chat completion may generate when the request sets no limit (a completion's default is
#: OpenAI's 16). The limit is reserved at admission, so "until the context is full" is not the default.
DEFAULT_CHAT_MAX_TOKENS = 256


class RequestError(ValueError):
    """A request the server understands but cannot run (answered 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


#: OpenAI fields this server does not implement, with the value that means "not used".
_UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "tools": None,
                "tool_choice": None, "functions": None, "response_format": None}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="extension: sample among the k most likely tokens (0: all)")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    policy: str | None = Field(default=None, description="extension: selection policy (default: the server's)")
    ignore_eos: bool = Field(default=False, description="extension: keep generating past the end-of-sequence token")

    def check_supported(self) -> None:
        """Reject OpenAI fields set to something this server does not implement."""
        extra = self.model_extra or {}
        for name, neutral in _UNSUPPORTED.items():
            value = extra.get(name)
            if not (value in (None, neutral, [], {}) or value is False):
                raise RequestError(f"{name}={value!r} is not supported by this server", param=name)

    @property
    def new_tokens(self) -> int:
        """The most tokens to generate."""
        return self.max_tokens or DEFAULT_CHAT_MAX_TOKENS

    def sampling(self) -> dict[str, Any]:
        """Keyword options for `LSAEngine.submit` (validated again by `SamplingParams`)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {"max_new_tokens": self.new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "stop": tuple(stop),
                "stop_at_eos": not self.ignore_eos}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. One prompt: a string or a list of token ids (a one-element list of either too)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError(f"one prompt per request, got {len(p)}", param="prompt")
            p = p[0]
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text; content parts must all be of type "text"."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"only text content parts are supported, got {part.get('type')!r}",
                                   param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for the tokenizer's chat template (OpenAI's "developer" role is a system turn)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS


# ---------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class MemoryReport(BaseModel):
    """What one request held and moved (measured by the engine), in the `memory` field of a response."""

    policy: str
    resident_fraction_mean: float
    resident_fraction_max: float
    device_kv_bytes_peak: int          # bytes of the tokens attention read on the device (peak)
    device_pages_bytes_peak: int       # bytes of the pool pages the request held (peak)
    device_kv_bytes_reserved: int      # bytes of the pool pages reserved at admission
    host_kv_bytes_peak: int
    full_kv_bytes: int
    index_bytes: int
    cycles: int
    transfers: dict[str, int]
    prefill_seconds: float
    decode_ms_per_token: float

    @classmethod
    def of(cls, report: GenerationReport) -> "MemoryReport":
        return cls(**{name: getattr(report, name) for name in cls.model_fields})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    memory: MemoryReport | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatDelta
    logprobs: None = None
    finish_reason: str | None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    memory: MemoryReport


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    memory: MemoryReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flashmemory"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
