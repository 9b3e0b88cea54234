"""An OpenAI-compatible chat endpoint (`saferl serve chat`): /v1/chat/completions, streamed or not.

Owns the wire format only: the OpenAI request fields SafeRL honours, the `chat.completion` and
`chat.completion.chunk` objects, server-sent events, `/v1/models`. What answers is a `ChatBackend` (for
`saferl serve chat`, `saferl.care_chat.CareChat`: the policy under CARE), called through a
`DynamicBatcher` so that requests arriving together are decoded together. Security defaults as every
`saferl serve` (`saferl.serving.server.secure_app`).

Honoured: `messages` (string content, or a list of text parts), `stream`, `stream_options.include_usage`,
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`. `n` must be 1; other fields are
ignored, as vLLM's server ignores what it does not support. Errors come in OpenAI's shape (a malformed
body is a 400 naming the field), except the body-size ones of `secure_app` (411/413, `detail`). `model` is echoed as the served name whatever
the request says. The usage block carries the backend's extra statistics (`usage.care` for CARE), in the
final chunk of a stream too (besides the standard usage-only chunk when `include_usage` is set).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from saferl.serving.batcher import DynamicBatcher
from saferl.serving.server import secure_app


@dataclass
class ChatResult:
    text: str
    finish_reason: str  # stop | length | content_filter
    prompt_tokens: int
    completion_tokens: int
    extra_usage: dict[str, Any] = field(default_factory=dict)  # merged into the usage block


class ChatBackend(Protocol):
    def job(self, messages: list[dict[str, str]], *, seed: int, max_tokens: int | None,
            temperature: float | None, top_p: float | None, on_text: Callable[[str], None] | None) -> Any: ...

    def complete(self, jobs: list[Any]) -> list[ChatResult]: ...


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = 1


def message_text(m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text":
            raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def usage_json(r: ChatResult) -> dict[str, Any]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens, **r.extra_usage}


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_chat_app(backend: ChatBackend, *, model: str, token: str | None, max_tokens: int,
                   max_body_bytes: int = 8 << 20, max_batch: int = 16, max_wait_s: float = 0.01) -> Any:
    """A FastAPI app serving `backend` as an OpenAI chat model named `model`; `max_tokens` caps a request's."""
    from fastapi import HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app, authorised = secure_app("SafeRL guarded chat", f"OpenAI-compatible chat completions from {model}, "
                                 "watched by a Stream guard (CARE).", token=token, max_body_bytes=max_body_bytes)

    def openai_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(status_code=status, headers=headers,
                            content={"error": {"message": message, "type": kind, "param": None, "code": status}})

    # Errors in OpenAI's shape, {"error": {"message", ...}}, which the openai client reads; a malformed body
    # is a 400 as on OpenAI's and vLLM's servers.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return openai_error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return openai_error(400, f"invalid request: {where}")
    batcher = DynamicBatcher(backend.complete, max_batch=max_batch, max_wait_s=max_wait_s)
    app.router.on_shutdown.append(batcher.close)
    started = int(time.time())

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "kind": "chat", "model": model, **batcher.stats()}

    @app.get("/v1/models", dependencies=[authorised])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": started,
                                            "owned_by": "saferl"}]}

    def make_job(request: ChatCompletionRequest, on_text: Callable[[str], None] | None) -> Any:
        if request.n != 1:
            raise HTTPException(400, detail=f"n must be 1, got {request.n}")
        try:
            messages = [{"role": m.role, "content": message_text(m)} for m in request.messages]
        except ValueError as e:
            raise HTTPException(400, detail=str(e)) from None
        if messages[-1]["role"] != "user":
            raise HTTPException(400, detail=f"the last message must be the user's, not {messages[-1]['role']!r}")
        wanted = request.max_completion_tokens or request.max_tokens
        if wanted is not None and wanted > max_tokens:
            raise HTTPException(400, detail=f"max_tokens {wanted} is more than this server allows ({max_tokens}, "
                                "--max-new-tokens)")
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return backend.job(messages, seed=seed, max_tokens=wanted, temperature=request.temperature,
                           top_p=request.top_p, on_text=on_text)

    @app.post("/v1/chat/completions", dependencies=[authorised])
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}
        if not request.stream:
            [result] = await asyncio.wrap_future(batcher.submit([make_job(request, None)]))
            return {**head, "object": "chat.completion", "usage": usage_json(result), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                 "finish_reason": result.finish_reason}]}
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        job = make_job(request, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
        future = batcher.submit([job])
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        include_usage = request.stream_options is not None and request.stream_options.include_usage

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
            return sse({**head, "object": "chat.completion.chunk", "usage": usage, "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            while (piece := await pieces.get()) is not None:
                yield chunk({"content": piece})
            try:
                [result] = await asyncio.wrap_future(future)
            except Exception as e:  # noqa: BLE001 - the stream has started: report in it
                yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
                return
            yield chunk({}, result.finish_reason, usage_json(result))
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_json(result)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
