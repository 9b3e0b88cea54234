"""RemoteGuardScorer failure handling against local stand-in endpoints: hung, garbage, down, and oversize input."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saferl.guard.remote import RemoteGuardScorer
from saferl.guard.scorer import ModerationItem
from saferl.types import SafetyLabel


def _chat_server(reply_text: str):
    """An OpenAI-compatible stand-in that answers every chat completion with `reply_text`."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply_text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server, seen


def _hung_endpoint():
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock


def _down_endpoint():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here any more
    return f"http://127.0.0.1:{port}"


ITEMS = [ModerationItem([{"role": "user", "content": f"question {i}"}], f"answer {i}") for i in range(6)]


def test_a_hung_endpoint_in_the_pool_is_retried_on_the_good_one():
    good, server, seen = _chat_server("Safety: Unsafe\nCategories: Violent\nRefusal: No")
    hung, sock = _hung_endpoint()
    # 1 s: the good endpoint must answer within it even on a loaded machine (0.3 s timed out there once).
    guard = RemoteGuardScorer([hung, good], protocol="openai", timeout_s=1.0, retries=2, backoff_s=0.01)
    verdicts = guard.moderate(ITEMS)
    assert [v.safety for v in verdicts] == [SafetyLabel.UNSAFE] * 6
    assert all(v.categories == ("Violent",) and v.refusal is False for v in verdicts)
    stats = guard.stats()
    assert stats["timeouts"] >= 1 and stats["retries"] == stats["timeouts"] and stats["fallbacks"] == 0
    # What the endpoint saw: the guard's messages (response as the assistant turn), greedy.
    assert seen[0]["messages"][-1]["role"] == "assistant" and seen[0]["temperature"] == 0.0
    server.shutdown()
    sock.close()


def test_every_endpoint_failing_gives_the_fallback_in_bounded_time():
    hung, sock = _hung_endpoint()
    guard = RemoteGuardScorer([hung, _down_endpoint()], protocol="openai", timeout_s=0.2, retries=2,
                              backoff_s=0.01, fallback="unsafe")
    start = time.monotonic()
    verdicts = guard.moderate(ITEMS)
    assert time.monotonic() - start < 5.0
    assert [v.safety for v in verdicts] == [SafetyLabel.UNSAFE] * 6 and all("fallback" in v.raw for v in verdicts)
    stats = guard.stats()
    assert stats["fallbacks"] == 6 and stats["retries"] == 12 and stats["timeouts"] + stats["errors"] == 18
    strict = RemoteGuardScorer([_down_endpoint()], protocol="saferl", retries=0, fallback="error")
    with pytest.raises(RuntimeError, match="failed 1 times"):
        strict.moderate(ITEMS[:1])
    sock.close()


def test_garbage_guard_output_is_a_counted_parse_failure():
    url, server, _ = _chat_server("lol I am not a guard")
    guard = RemoteGuardScorer([url], protocol="openai")
    verdicts = guard.moderate(ITEMS[:3])
    assert all(not v.parse_ok and v.safety is None for v in verdicts)
    assert guard.stats()["parse_failures"] == 3 and guard.stats()["fallbacks"] == 0
    server.shutdown()


def test_oversize_input_is_truncated_and_counted():
    url, server, seen = _chat_server("Safety: Safe\nCategories: None\nRefusal: No")
    guard = RemoteGuardScorer([url], protocol="openai", max_input_chars=100)
    long_answer = "start " + "x" * 500 + " end"
    long_prompt = [{"role": "user", "content": "y" * 300 + " tail"}]
    verdicts = guard.moderate([ModerationItem([{"role": "user", "content": "q"}], long_answer),
                               ModerationItem(long_prompt, None)])
    assert all(v.parse_ok for v in verdicts) and guard.stats()["truncated"] == 2
    sent = {m["messages"][-1]["content"] for m in seen}
    assert ("x" * 96 + " end") in sent and ("y" * 95 + " tail") in sent  # the newest 100 characters
    server.shutdown()


def test_oversize_context_loses_its_oldest_turns_first():
    """A short judged turn after long earlier turns: the earlier turns go (the cap counted only the judged
    text, so the whole conversation went out); the question and the judged response stay whole."""
    url, server, seen = _chat_server("Safety: Safe\nCategories: None\nRefusal: No")
    guard = RemoteGuardScorer([url], protocol="openai", max_input_chars=100)
    history = [{"role": "user", "content": "a" * 300}, {"role": "assistant", "content": "b" * 300}]
    guard.moderate([ModerationItem([*history, {"role": "user", "content": "c" * 60}], "d" * 30)])
    assert guard.stats()["truncated"] == 1
    last_turns = [{"role": "user", "content": "c" * 60}, {"role": "assistant", "content": "d" * 30}]
    assert seen[0]["messages"] == last_turns
    server.shutdown()


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="guard.urls"):
        RemoteGuardScorer([])
    with pytest.raises(ValueError):
        RemoteGuardScorer(["http://127.0.0.1:1"], protocol="grpc")


def test_remote_rm_falls_back_or_raises_when_down():
    from saferl.serving.client import RemoteHelpfulnessScorer

    pairs = [([{"role": "user", "content": "q"}], "a")] * 3
    neutral = RemoteHelpfulnessScorer([_down_endpoint()], retries=1, backoff_s=0.01, fallback_score=0.0)
    assert neutral.score(pairs) == [0.0, 0.0, 0.0]
    assert neutral.stats()["fallbacks"] == 3 and neutral.stats()["errors"] == 2
    strict = RemoteHelpfulnessScorer([_down_endpoint()], retries=0)
    with pytest.raises(RuntimeError, match="fallback_score"):
        strict.score(pairs)
