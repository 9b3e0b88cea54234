"""The HTTP reward server behind `saferl serve guard|rm`: a GuardScorer or HelpfulnessScorer over JSON.

Safe by default, unlike the reward servers users of the peers complain about:
- binds 127.0.0.1 unless told otherwise, and refuses any other address without a bearer token;
- speaks JSON only (pydantic-validated; no pickle), with its OpenAPI schema at /openapi.json and docs at /docs;
- rejects bodies over `max_body_bytes` (413) or without a length (411), bad JSON or missing fields (422)
  and a wrong or missing token (401), each with a message, and keeps serving;
- coalesces concurrent requests into model batches (`DynamicBatcher`).

Endpoints: GET /health, POST /v1/moderate (guard), POST /v1/score (helpfulness RM).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hmac
import ipaddress
import socket
from typing import Any

from pydantic import BaseModel, Field

from saferl.serving.batcher import DynamicBatcher

LOOPBACK = "127.0.0.1"


class Message(BaseModel):
    role: str
    content: str


class ModerateItem(BaseModel):
    messages: list[Message] = Field(min_length=1)
    response: str | None = Field(None, description="the response to judge; null judges the last user turn")


class ModerateRequest(BaseModel):
    items: list[ModerateItem] = Field(min_length=1)


class Verdict(BaseModel):
    safety: str | None = Field(description="Safe | Unsafe | Controversial; null when the output did not parse")
    categories: list[str]
    refusal: bool | None
    parse_ok: bool
    raw: str


class ModerateResponse(BaseModel):
    verdicts: list[Verdict]


class ScoreItem(BaseModel):
    messages: list[Message] = Field(min_length=1)
    response: str


class ScoreRequest(BaseModel):
    items: list[ScoreItem] = Field(min_length=1)


class ScoreResponse(BaseModel):
    scores: list[float]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose a scorer beyond this machine without authentication."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to bind {host} without a bearer token: pass --token-file (or set "
                         "SAFERL_SERVE_TOKEN), or bind 127.0.0.1")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, taken before any weights load so a busy or invalid address fails at
    once; the server later serves on this very socket (connections made meanwhile wait in its backlog)."""
    where = f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise ValueError(f"cannot bind {where}: the port must be in 0-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot bind {where}: unknown host ({e.strerror})") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may rebind at once
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (another server is using it)" if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot bind {where}: {e.strerror}{hint}") from e
    sock.listen()  # only a listening socket keeps others (binding with SO_REUSEADDR too) off the port
    return sock


class _BodyLimit:
    """ASGI middleware: a POST needs a Content-Length (else 411) of at most `max_body_bytes` (else 413).

    Plain ASGI rather than `@app.middleware("http")` (Starlette's BaseHTTPMiddleware), which costs about
    0.5 ms a request (a task and memory streams per call): a stream-guard client sends one request per token.
    """

    def __init__(self, app: Any, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from fastapi.responses import JSONResponse

            length = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None)
            error = None
            if scope["method"] == "POST" and length is None:  # a streamed body could be any size
                error = JSONResponse(status_code=411, content={"detail": "a Content-Length header is required"})
            elif length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                error = JSONResponse(status_code=413, content={"detail": f"body larger than {self.max_body_bytes} "
                                                                         "bytes"})
            if error is not None:
                await error(scope, receive, send)
                return
        await self.app(scope, receive, send)


def secure_app(title: str, description: str, *, token: str | None, max_body_bytes: int) -> tuple[Any, Any]:
    """A FastAPI app with this module's defaults (body limit: 411/413; JSON errors) and the bearer-token
    dependency to put on its endpoints (401 on a missing or wrong token). Shared by every `saferl serve`."""
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    app = FastAPI(title=title, version="1", description=description)
    bearer = HTTPBearer(auto_error=False)

    # async: FastAPI runs a plain `def` dependency in its thread pool, ~0.2 ms a request.
    async def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    app.add_middleware(_BodyLimit, max_body_bytes=max_body_bytes)
    return app, Depends(authorised)


def build_app(kind: str, scorer: Any, *, model: str, token: str | None, max_body_bytes: int = 8 << 20,
              max_batch: int = 64, max_wait_s: float = 0.005) -> Any:
    """A FastAPI app serving `scorer` (GuardScorer for kind='guard', HelpfulnessScorer for kind='rm')."""
    if kind not in ("guard", "rm"):
        raise ValueError(f"kind must be 'guard' or 'rm', got {kind!r}")
    app, authorised = secure_app(f"SafeRL {kind} reward server", f"Scores with {model}. JSON only; bearer "
                                 "token when configured.", token=token, max_body_bytes=max_body_bytes)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "kind": kind, "model": model, **batcher.stats()}

    if kind == "guard":
        from saferl.types import ModerationItem

        batcher = DynamicBatcher(scorer.moderate, max_batch=max_batch, max_wait_s=max_wait_s)

        # Async handlers: waiting requests hold no worker thread, so all of them can join one batch.
        @app.post("/v1/moderate", response_model=ModerateResponse, dependencies=[authorised])
        async def moderate(request: ModerateRequest) -> ModerateResponse:
            items = [ModerationItem([m.model_dump() for m in it.messages], it.response) for it in request.items]
            verdicts = await asyncio.wrap_future(batcher.submit(items))
            return ModerateResponse(verdicts=[verdict_json(v) for v in verdicts])
    else:
        batcher = DynamicBatcher(scorer.score, max_batch=max_batch, max_wait_s=max_wait_s)

        @app.post("/v1/score", response_model=ScoreResponse, dependencies=[authorised])
        async def score(request: ScoreRequest) -> ScoreResponse:
            pairs = [([m.model_dump() for m in it.messages], it.response) for it in request.items]
            return ScoreResponse(scores=await asyncio.wrap_future(batcher.submit(pairs)))

    app.router.on_shutdown.append(batcher.close)
    return app


def verdict_json(verdict: Any) -> Verdict:
    fields = dataclasses.asdict(verdict)
    safety = verdict.safety.value if verdict.safety is not None else None
    return Verdict(safety=safety, categories=list(fields["categories"]), refusal=fields["refusal"],
                   parse_ok=fields["parse_ok"], raw=fields["raw"])
