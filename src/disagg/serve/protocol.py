"""The OpenAI-compatible wire format: request models, response and stream-chunk builders, errors.

Requests are validated once, here, with pydantic; every field that arrives from the network is
typed and bounded. Extra fields are ignored as OpenAI does, except those that would change the
output and that we do not implement (n > 1, echo, penalties), which are refused with a 400.
vLLM's extensions that matter for serving are accepted: top_k, ignore_eos, stop_token_ids,
kv_transfer_params (the two-phase protocol) and our own first_token_ids inside it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from disagg.engine.sampling import MAX_LOGPROBS, SEED_RANGE, SamplingParams
from disagg.errors import InvalidRequestError
from disagg.kv.params import KVTransferParams


class StreamOptions(BaseModel):
    include_usage: bool = False


def _check_unicode(value: Any) -> None:
    """Every string in a request must be encodable (JSON lets a lone surrogate like \\ud800 through;
    a tokenizer does not). Iterative: a body may be nested as deep as its parser allowed."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"strings must be valid Unicode; found a lone surrogate at position {e.start}") from e
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data

    model: str | None = Field(default=None, max_length=512)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = Field(default=None, max_length=512)
    kv_transfer_params: KVTransferParams | None = None
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids in the answer

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("presence and frequency penalties are not supported; send 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=self.seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                              ignore_eos=self.ignore_eos, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] = Field(max_length=1_000_000)
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        return v

    def sampling_params(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] = Field(max_length=1_000_000)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def sampling_params(self) -> SamplingParams:
        max_tokens = max_tokens_of(self.model_dump(include={"max_tokens", "max_completion_tokens"}), chat=True)
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def max_tokens_of(body: dict[str, Any], chat: bool) -> Any:
    """The output-token limit a request asks for, by OpenAI's rule: in chat, max_completion_tokens
    wins over the deprecated max_tokens; completions have only max_tokens. None when not given;
    not validated here (the request models above do that). The worker, the proxy and the router
    all read the limit through this."""
    limit = body.get("max_completion_tokens") if chat else None
    return body.get("max_tokens") if limit is None else limit


def validation_message(exc: ValidationError | Any) -> str:
    """One line from a pydantic or FastAPI validation error (both have .errors())."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON"
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def refusal(body: dict[str, Any], chat: bool) -> str | None:
    """Why a client's request is refused before any worker sees it, or None: it must be valid as the
    workers' own request models read it, and must not carry kv_transfer_params (the proxy's to set:
    from a client they would make workers hold, reserve or fetch KV on its say-so)."""
    if "kv_transfer_params" in body:
        return "kv_transfer_params is set by the proxy, not by clients: send the request without it"
    try:
        request = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        request.sampling_params()
        if isinstance(request, ChatCompletionRequest):
            request.chat_messages()
    except ValidationError as e:
        return validation_message(e)
    except InvalidRequestError as e:
        return str(e)
    return None


# ---- responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, err_type: str = "invalid_request_error", code: int = 400,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def now() -> int:
    return int(time.time())


SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def stream_chunk(rid: str, created: int, model: str | None, chat: bool, text: str, *, role: bool = False,
                 finish_reason: str | None = None, stop_reason: int | str | None = None,
                 logprobs: dict[str, Any] | None = None, token_ids: list[int] | None = None,
                 prompt_token_ids: list[int] | None = None) -> dict[str, Any]:
    """A streamed completion (or chat completion, with `role` on its first delta) chunk; with
    return_token_ids, the chunk's token ids (and, on the first, the prompt's), as vLLM sends them."""
    base = {"id": rid, "created": created, "model": model}
    tail: dict[str, Any] = {"logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}
    if token_ids is not None:
        tail["token_ids"] = token_ids
    if prompt_token_ids is not None:
        tail["prompt_token_ids"] = prompt_token_ids
    if chat:
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        return base | {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta} | tail]}
    return base | {"object": "text_completion", "choices": [{"index": 0, "text": text} | tail]}


def usage_chunk(rid: str, created: int, model: str | None, chat: bool, usage_body: Any) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage_body}
