"""`secure_app`'s body limit, called as plain ASGI: a POST without a Content-Length gets 411, one over the limit
413, and anything else reaches the endpoint."""

import asyncio
import json


def call(app, method, headers, body=b""):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": "/echo", "raw_path": b"/echo", "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent, chunks = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_body_limit_411_413_and_through():
    from saferl.serving.server import secure_app

    app, authorised = secure_app("t", "t", token=None, max_body_bytes=10)

    @app.post("/echo", dependencies=[authorised])
    async def echo(body: dict) -> dict:
        return body

    assert call(app, "POST", []) == (411, {"detail": "a Content-Length header is required"})
    assert call(app, "POST", [(b"content-length", b"11")], b"x" * 11) == (413, {"detail": "body larger than 10 bytes"})
    assert call(app, "POST", [(b"content-length", b"1e3")], b"{}")[0] == 413
    ok = [(b"content-length", b"8"), (b"content-type", b"application/json")]
    assert call(app, "POST", ok, b'{"a": 1}') == (200, {"a": 1})
