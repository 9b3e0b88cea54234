"""`saferl serve stream-guard` over HTTP against the in-process `StreamBatch`: per-token verdicts, rollback,
text, the stream cap, expiry and bad requests.

One server (a synthetic 2-layer Stream guard on a tiny tokenizer, so no toy world is needed) for the module,
with a bearer token, 3 streams at most and a small body limit; each test closes the streams it opens.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "stream-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORDS = ["user", "assistant", "how", "do", "I", "bake", "bread", "at", "home", "hello", "you", "dragon"]
USER = [{"role": "user", "content": "how do I bake bread at home"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory, tiny_tokenizer):
    from saferl.guard.stream_model import write_synthetic_stream_guard

    return write_synthetic_stream_guard(tmp_path_factory.mktemp("stream_guard"), tiny_tokenizer(WORDS), seed=0,
                                        hidden_size=64, num_hidden_layers=2, guard_inner_size=32)


@pytest.fixture(scope="module")
def server(guard_dir, tmp_path_factory, wait_http):
    import httpx

    tmp = tmp_path_factory.mktemp("serve_stream")
    (tmp / "token").write_text(TOKEN + "\n")
    port = _free_port()
    log = tmp / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "saferl.cli", "serve", "stream-guard", "-m", str(guard_dir),
                             "--port", str(port), "--token-file", str(tmp / "token"), "--max-streams", "3",
                             "--max-stream-tokens", "200", "--max-body-mib", "1"], cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/health", log, 300, pause=0.3)
    client = httpx.Client(base_url=url, headers=AUTH, timeout=60)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local(guard_dir):
    from transformers import AutoTokenizer

    from saferl.guard.conversation import role_tokens
    from saferl.guard.stream_model import load_stream_guard

    tokenizer = AutoTokenizer.from_pretrained(guard_dir)
    return load_stream_guard(guard_dir), tokenizer, role_tokens(tokenizer)


def answer(tokenizer, n, seed=0):
    words = [WORDS[(seed * 5 + 3 * i) % len(WORDS)] for i in range(n)]
    return tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:n]


def ok(response):
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


def test_verdicts_over_http_equal_the_in_process_stream_batch(server, local):
    from saferl.guard.conversation import encode_prompt
    from saferl.guard.decisions import debounce
    from saferl.guard.stream import StreamBatch

    model, tokenizer, roles = local
    ids = [answer(tokenizer, 30, seed) for seed in (0, 1)]
    opened = [ok(server.post("/v1/streams", json={"messages": USER})) for _ in ids]
    got: list[list[dict]] = [[], []]
    for i in range(0, 30, 4):  # two streams interleaved, chunks of 4
        for k, o in enumerate(opened):
            got[k] += ok(server.post(f"/v1/streams/{o['id']}/append", json={"tokens": ids[k][i:i + 4]}))["verdicts"]
    last = ok(server.post(f"/v1/streams/{opened[1]['id']}/append", json={"tokens": []}))

    batch = StreamBatch(model, roles, pad_id=tokenizer.pad_token_id)
    prefix = encode_prompt(tokenizer, USER)
    [pre] = batch.prefill([prefix])
    want = [batch.feed({0: [t]})[0].verdicts[0] for t in ids[1]]  # one token at a time
    q = pre.verdicts[0]
    assert opened[1]["query"] == {"position": q.position, "token": None, "risk": q.risk, "risk_prob": pytest.approx(
        q.risk_prob, abs=1e-5), "category": q.category, "category_prob": pytest.approx(q.category_prob, abs=1e-5)}
    assert opened[1]["prefix_tokens"] == len(prefix)
    assert [(v["position"], v["token"], v["risk"], v["category"]) for v in got[1]] == [
        (w.position, t, w.risk, w.category) for w, t in zip(want, ids[1])]
    assert [v["risk_prob"] for v in got[1]] == pytest.approx([w.risk_prob for w in want], abs=1e-4)
    detection = debounce([w.risk for w in want], "official", [w.category for w in want])
    assert last["decision"]["position"] == detection.index and last["decision"]["label"] == detection.label.value
    assert len({v["risk"] for v in got[1]}) > 1  # the random heads vary: the comparison means something
    for o in opened:
        ok(server.delete(f"/v1/streams/{o['id']}"))


def test_rollback_then_reappend_equals_never_sending(server, local):
    _, tokenizer, _ = local
    ids = answer(tokenizer, 24, seed=2)
    wrong = [(t + 7) % len(tokenizer) for t in ids[10:18]]
    a = ok(server.post("/v1/streams", json={"messages": USER}))["id"]
    b = ok(server.post("/v1/streams", json={"messages": USER}))["id"]
    clean = ok(server.post(f"/v1/streams/{a}/append", json={"tokens": ids}))["verdicts"]
    ok(server.post(f"/v1/streams/{b}/append", json={"tokens": ids[:10] + wrong}))
    back = ok(server.post(f"/v1/streams/{b}/rollback", json={"n": len(wrong)}))
    assert back["length"] == 10
    again = ok(server.post(f"/v1/streams/{b}/append", json={"tokens": ids[10:]}))["verdicts"]
    assert [(v["position"], v["risk"], v["category"]) for v in again] == [
        (v["position"], v["risk"], v["category"]) for v in clean[10:]]
    assert [v["risk_prob"] for v in again] == pytest.approx([v["risk_prob"] for v in clean[10:]], abs=1e-4)

    text = "how do I bake bread at home hello dragon"  # text in chunks cut inside words: the whole text's ids
    t = ok(server.post("/v1/streams", json={"messages": USER}))["id"]
    final = {}
    for piece in (text[:5], text[5:13], text[13:21], text[21:]):
        for v in ok(server.post(f"/v1/streams/{t}/append", json={"text": piece}))["verdicts"]:
            final[v["position"]] = (v["token"], v["risk"])
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    ok(server.post(f"/v1/streams/{a}/rollback", json={"n": len(ids)}))  # stream a, emptied, takes the ids
    ref = ok(server.post(f"/v1/streams/{a}/append", json={"tokens": whole}))["verdicts"]
    assert list(final.values()) == [(v["token"], v["risk"]) for v in ref]
    for sid in (a, b, t):
        ok(server.delete(f"/v1/streams/{sid}"))


def test_cap_expiry_and_bad_requests_get_4xx_and_the_server_stays_up(server, local):
    _, tokenizer, _ = local
    ids = [ok(server.post("/v1/streams", json={"messages": USER}))["id"] for _ in range(3)]
    full = server.post("/v1/streams", json={"messages": USER})
    assert full.status_code == 429 and "--max-streams" in full.json()["detail"]
    ok(server.delete(f"/v1/streams/{ids.pop()}"))
    short = ok(server.post("/v1/streams", json={"messages": USER, "idle_timeout_s": 0.3}))["id"]
    time.sleep(1.5)
    expired = server.post(f"/v1/streams/{short}/append", json={"tokens": [1]})
    assert expired.status_code == 404 and "expired" in expired.json()["detail"]
    s = ids[0]
    checks = [
        (server.post(f"/v1/streams/{s}/append", content=b"{nope", headers={"content-type": "application/json"}),
         422, "JSON decode error"),
        (server.post("/v1/streams", json={}), 422, "messages"),
        (server.post("/v1/streams", json={"messages": [*USER, {"role": "assistant", "content": "hi"}]}), 400,
         "user turn"),
        (server.post(f"/v1/streams/{s}/append", json={"tokens": [len(tokenizer) + 99]}), 400, "vocabulary"),
        (server.post(f"/v1/streams/{s}/append", json={"tokens": [1], "text": "hi"}), 400, "exactly one"),
        (server.post(f"/v1/streams/{s}/append", json={"tokens": [1] * 500}), 400, "max-stream-tokens"),
        (server.post(f"/v1/streams/{s}/rollback", json={"n": 3}), 400, "cannot roll back 3"),
        (server.post(f"/v1/streams/{s}/rollback", json={"n": -1}), 422, "greater than or equal"),
        (server.post("/v1/streams/nope/append", json={"tokens": [1]}), 404, "no open stream"),
        (server.post("/v1/streams", json={"messages": USER}, headers={"Authorization": "Bearer bad"}), 401,
         "bearer token"),
        (server.post(f"/v1/streams/{s}/append", content=b"x" * (2 << 20)), 413, "larger than"),
    ]
    for response, status, message in checks:
        assert response.status_code == status, (response.status_code, response.text)
        assert message in response.text
    assert ok(server.post(f"/v1/streams/{s}/append", json={"tokens": [1, 2]}))["length"] == 2
    health = ok(server.get("/health"))
    assert health["status"] == "ok" and health["open_streams"] == 2
    assert "/v1/streams/{stream_id}/append" in ok(server.get("/openapi.json"))["paths"]
    for sid in ids:
        ok(server.delete(f"/v1/streams/{sid}"))


def test_batch_append_equals_appending_each_and_reports_failures_per_stream(server, local):
    _, tokenizer, _ = local
    ids = [answer(tokenizer, 12, seed) for seed in (3, 4)]
    batch = [ok(server.post("/v1/streams", json={"messages": USER}))["id"] for _ in ids]
    got: list[list] = [[], []]
    for i in range(0, 12, 3):
        body = {"streams": [{"id": s, "tokens": t[i:i + 3]} for s, t in zip(batch, ids)] + [{"id": "nope",
                                                                                             "tokens": [1]}]}
        replies = ok(server.post("/v1/streams/append", json=body))["streams"]
        assert replies[2]["status"] == 404 and "no open stream" in replies[2]["detail"]
        for k in (0, 1):
            got[k] += replies[k]["verdicts"]
    for k, t in enumerate(ids):
        ok(server.delete(f"/v1/streams/{batch[k]}"))
        alone = ok(server.post("/v1/streams", json={"messages": USER}))["id"]
        want = ok(server.post(f"/v1/streams/{alone}/append", json={"tokens": t}))["verdicts"]
        assert [(v["position"], v["token"], v["risk"]) for v in got[k]] == [
            (v["position"], v["token"], v["risk"]) for v in want]
        ok(server.delete(f"/v1/streams/{alone}"))
    assert server.post("/v1/streams/append", json={"streams": []}).status_code == 422


def test_live_websocket_equals_the_in_process_stream_batch_and_refuses_bad_frames(server, local):
    import json

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from saferl.guard.conversation import encode_prompt
    from saferl.guard.stream import StreamBatch

    model, tokenizer, roles = local
    ids = answer(tokenizer, 20, seed=5)
    wrong = [(t + 5) % len(tokenizer) for t in ids[8:12]]
    s = ok(server.post("/v1/streams", json={"messages": USER}))["id"]
    url = str(server.base_url).replace("http://", "ws://") + f"/v1/streams/{s}/live"
    with connect(url, additional_headers=AUTH) as ws:
        def send(frame):
            ws.send(json.dumps(frame))
            return json.loads(ws.recv())

        got = [v for t in ids[:8] for v in send({"tokens": [t]})["verdicts"]]  # one token per frame
        assert send({"tokens": wrong})["length"] == 12
        assert send({"rollback": len(wrong)})["length"] == 8
        for chunk in (ids[8:9], ids[9:14], ids[14:]):  # pipelined: three frames sent before any reply is read
            ws.send(json.dumps({"tokens": chunk}))
        replies = [json.loads(ws.recv()) for _ in range(3)]
        got += [v for r in replies for v in r["verdicts"]]
        assert replies[-1]["length"] == 20
        refused = [send(f) for f in ({"tokens": [1], "rollback": 1}, {"rollback": -1},
                                     {"tokens": [1], "text": "a"}, {"rollback": 99})]
        assert [r["status"] for r in refused] == [400, 422, 400, 400], refused
        ws.send(b'{"tokens": []}')  # a binary frame is read as the same JSON
        assert json.loads(ws.recv())["length"] == 20
        ws.send(b"\xff{nope")  # not JSON, not UTF-8: refused, the socket stays open
        assert json.loads(ws.recv())["status"] == 422
        assert send({"tokens": []})["length"] == 20
    with connect(url.replace(s, "nope"), additional_headers=AUTH) as ws:
        ws.send(json.dumps({"tokens": [1]}))
        reply = json.loads(ws.recv())
        assert reply["status"] == 404 and "no open stream" in reply["detail"]
    for headers in ({}, {"Authorization": "Bearer bad"}, {**AUTH, "Origin": "http://evil.example"}):
        with pytest.raises(InvalidStatus) as refusal:
            connect(url, additional_headers=headers)
        assert refusal.value.response.status_code == 403
    assert ok(server.get("/health"))["status"] == "ok"

    batch = StreamBatch(model, roles, pad_id=tokenizer.pad_token_id)
    batch.prefill([encode_prompt(tokenizer, USER)])
    want = [batch.feed({0: [t]})[0].verdicts[0] for t in ids]
    assert [(v["position"], v["token"], v["risk"], v["category"]) for v in got] == [
        (w.position, t, w.risk, w.category) for w, t in zip(want, ids)]
    assert [v["risk_prob"] for v in got] == pytest.approx([w.risk_prob for w in want], abs=1e-4)
    assert [v["category_prob"] for v in got] == pytest.approx([w.category_prob for w in want], abs=1e-4)
    ok(server.delete(f"/v1/streams/{s}"))
