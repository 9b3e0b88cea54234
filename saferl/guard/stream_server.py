"""The HTTP API of `saferl serve stream-guard`: live token-level moderation streams over JSON.

Owns the wire format only; the streams, ticks, bounds and decisions are `saferl.guard.stream_service`'s, and
the security defaults (loopback unless a bearer token is set, JSON only, body limits, OpenAPI at
/openapi.json) `saferl.serving.server`'s.

Endpoints (all POST bodies JSON):
  POST   /v1/streams                   {messages, idle_timeout_s?} -> {id, prefix_tokens, query, ...}
  POST   /v1/streams/{id}/append       {tokens: [ids]} or {text: "..."} -> per-token verdicts + decision
  POST   /v1/streams/append            {streams: [{id, tokens | text}, ...]} -> one reply or error per stream,
                                       all applied in one tick (a chat server decoding many streams at once)
  POST   /v1/streams/{id}/rollback     {n} -> the stream's length and decision after forgetting n tokens
  DELETE /v1/streams/{id}              close the stream
  WS     /v1/streams/{id}/live         one persistent connection per stream: each text frame is an append body
                                       ({tokens} or {text}) or {rollback: n}, answered in order by one frame
                                       (the reply, or {status, detail} when refused); a stream's client pays
                                       no HTTP request per token. Closing the socket leaves the stream open
  GET    /health                       open streams, ticks, tokens fed

Errors: 400 (a request the stream cannot take), 401, 404 (unknown or expired stream, with the reason), 411,
413, 422 (malformed body), 429 (stream cap), each as {"detail": message}. The WebSocket handshake is refused
(403) without the bearer token when one is set, and whenever it carries an `Origin` header: browsers send one
and a WebSocket has no CORS preflight, so this keeps web pages off a loopback server as "JSON only" does for
the POST endpoints. Frames are limited by uvicorn's `ws_max_size` (the server sets it to the body limit).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from starlette.websockets import WebSocket  # here, not in the builder: FastAPI reads annotations from globals

from saferl.guard.decisions import Detection
from saferl.guard.stream_service import Reply, StreamError, StreamService
from saferl.serving.server import Message, secure_app
from saferl.types import StreamVerdict


class OpenRequest(BaseModel):
    messages: list[Message] = Field(min_length=1, description="the conversation so far, ending with a user turn")
    idle_timeout_s: float | None = Field(None, description="close the stream after this long without a request "
                                         "(at most the server's; default the server's)")


class AppendRequest(BaseModel):
    tokens: list[int] | None = Field(None, description="guard token ids of the answer's next tokens")
    text: str | None = Field(None, description="the answer's next text, tokenized with the guard's tokenizer")


class LiveFrame(BaseModel):
    tokens: list[int] | None = Field(None, description="append these guard token ids")
    text: str | None = Field(None, description="append this text")
    rollback: int | None = Field(None, ge=0, description="instead, forget this many answer tokens, newest "
                                 "first")


class StreamAppend(BaseModel):
    id: str = Field(description="the stream")
    tokens: list[int] | None = Field(None, description="guard token ids of the answer's next tokens")
    text: str | None = Field(None, description="the answer's next text, tokenized with the guard's tokenizer")


class BatchAppendRequest(BaseModel):
    streams: list[StreamAppend] = Field(min_length=1, description="appends to apply in one tick")


class RollbackRequest(BaseModel):
    n: int = Field(ge=0, description="answer tokens to forget, newest first")


class TokenVerdict(BaseModel):
    position: int = Field(description="index in the stream's token sequence (prefix included)")
    token: int | None = Field(description="the token id read here (null for the query verdict)")
    risk: str = Field(description="Safe | Unsafe | Controversial")
    risk_prob: float
    category: str = Field(description="the most likely category; meaningful only when risk is not Safe")
    category_prob: float


class Decision(BaseModel):
    flagged: bool = Field(description="a debounced detection that counts under the server's mode")
    label: str = Field(description="Safe, or the debounced detection's Unsafe | Controversial")
    category: str | None
    position: int | None = Field(description="answer token index of the detection (the pair's second token)")


class StreamReply(BaseModel):
    id: str
    length: int = Field(description="answer tokens the stream holds")
    rolled_back: int = Field(0, description="tokens re-tokenized away before this append (text appends)")
    verdicts: list[TokenVerdict]
    decision: Decision


class AppendFailure(BaseModel):
    id: str
    status: int = Field(description="the HTTP status this append alone would have got (400, 404)")
    detail: str


class BatchAppendReply(BaseModel):
    streams: list[StreamReply | AppendFailure] = Field(description="in the request's order")


class OpenReply(BaseModel):
    id: str
    prefix_tokens: int
    query: TokenVerdict | None = Field(description="the prompt's verdict, read at the user turn's end")
    idle_timeout_s: float


def token_verdict(v: StreamVerdict, token: int | None) -> TokenVerdict:
    return TokenVerdict(position=v.position, token=token, risk=v.risk, risk_prob=v.risk_prob,
                        category=v.category, category_prob=v.category_prob)


def decision_json(d: Detection, flagged: bool) -> Decision:
    return Decision(flagged=flagged, label=str(d.label.value), category=d.category, position=d.index)


def stream_reply(r: Reply) -> StreamReply:
    return StreamReply(id=r.id, length=r.length, rolled_back=r.rolled_back,
                       verdicts=[token_verdict(v, t) for v, t in zip(r.verdicts, r.tokens)],
                       decision=decision_json(r.decision, r.flagged))


def build_stream_app(service: StreamService, *, model: str, token: str | None,
                     max_body_bytes: int = 1 << 20) -> Any:
    """A FastAPI app serving `service`'s streams."""
    from fastapi import HTTPException

    app, authorised = secure_app("SafeRL stream-guard server", f"Token-level moderation streams with {model} "
                                 "(Qwen3Guard-Stream). JSON only; bearer token when configured.", token=token,
                                 max_body_bytes=max_body_bytes)

    async def done(future: Any) -> Reply:
        try:
            return await asyncio.wrap_future(future)
        except StreamError as e:
            raise HTTPException(status_code=e.status, detail=e.message) from None

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "kind": "stream-guard", "model": model, **service.stats()}

    @app.post("/v1/streams", response_model=OpenReply, dependencies=[authorised])
    async def open_stream(request: OpenRequest) -> OpenReply:
        messages = [m.model_dump() for m in request.messages]
        reply = await done(service.open(messages, request.idle_timeout_s))
        query = token_verdict(reply.verdicts[0], None) if reply.verdicts else None
        timeout = service.streams[reply.id].idle_timeout_s if reply.id in service.streams else 0.0
        return OpenReply(id=reply.id, prefix_tokens=reply.prefix, query=query, idle_timeout_s=timeout)

    @app.post("/v1/streams/{stream_id}/append", response_model=StreamReply, dependencies=[authorised])
    async def append(stream_id: str, request: AppendRequest) -> StreamReply:
        return stream_reply(await done(service.append(stream_id, request.tokens, request.text)))

    @app.post("/v1/streams/append", response_model=BatchAppendReply, dependencies=[authorised])
    async def append_many(request: BatchAppendRequest) -> BatchAppendReply:
        futures = service.append_many([(a.id, a.tokens, a.text) for a in request.streams])
        replies: list[StreamReply | AppendFailure] = []
        for a, future in zip(request.streams, futures):
            try:
                replies.append(stream_reply(await asyncio.wrap_future(future)))
            except StreamError as e:
                replies.append(AppendFailure(id=a.id, status=e.status, detail=e.message))
        return BatchAppendReply(streams=replies)

    async def live_frame(stream_id: str, frame: str | bytes) -> str:
        """One frame of `/live`: the reply's JSON, or {status, detail} when the frame is refused."""
        try:
            request = LiveFrame.model_validate_json(frame)
            if request.rollback is not None and (request.tokens, request.text) != (None, None):
                raise StreamError(400, "a frame is an append ({tokens} or {text}) or a {rollback}, not both")
            future = (service.rollback(stream_id, request.rollback) if request.rollback is not None
                      else service.append(stream_id, request.tokens, request.text))
            return stream_reply(await asyncio.wrap_future(future)).model_dump_json()
        except ValidationError as e:
            return json.dumps({"status": 422, "detail": e.errors(include_url=False, include_context=False,
                                                                      include_input=False)})
        except StreamError as e:
            return json.dumps({"status": e.status, "detail": e.message})

    @app.websocket("/v1/streams/{stream_id}/live")
    async def live(websocket: WebSocket, stream_id: str) -> None:
        given = websocket.headers.get("authorization", "")
        if "origin" in websocket.headers or (token is not None and not hmac.compare_digest(
                given.encode(), f"Bearer {token}".encode())):
            await websocket.close(code=1008)  # before accept: the handshake gets 403
            return
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("text")
            frame = frame if frame is not None else message["bytes"]
            await websocket.send_text(await live_frame(stream_id, frame))

    @app.post("/v1/streams/{stream_id}/rollback", response_model=StreamReply, dependencies=[authorised])
    async def rollback(stream_id: str, request: RollbackRequest) -> StreamReply:
        return stream_reply(await done(service.rollback(stream_id, request.n)))

    @app.delete("/v1/streams/{stream_id}", response_model=StreamReply, dependencies=[authorised])
    async def close(stream_id: str) -> StreamReply:
        return stream_reply(await done(service.close(stream_id)))

    app.router.on_shutdown.append(service.shutdown)
    return app
