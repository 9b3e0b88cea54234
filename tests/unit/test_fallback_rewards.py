"""No failure of a remote judge scores better than its configured fallback (issue 14.3).

Stand-in endpoints fail in every way we know (timeout, connection refused, 500, a 200 that is not JSON or has
the wrong shape, the wrong number of verdicts, verdicts lacking fields, garbage guard text); each goes
through RemoteGuardScorer (both protocols) and the hybrid and guard_only recipes under every RewardRules
safety setting, for helpfulness values up to 1e6. The peers' bug, a timeout scored as reward 0 (+10 over a
-10 unsafe cap), must not happen.
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards.base import RewardRules
from rewards.guard_only import guard_only
from rewards.hybrid import hybrid
from saferl.actor_group import ActorGroup
from saferl.handles import GuardGroup, HelpfulnessGroup
from saferl.guard.remote import RemoteGuardScorer
from saferl.guard.scorer import ModerationItem
from saferl.scoring import score_rollouts
from saferl.serving.client import RemoteHelpfulnessScorer
from saferl.types import GuardVerdict, Prompt, RewardInputs, Rollout, SafetyLabel

GOOD_TEXT = "Safety: Unsafe\nCategories: Violent\nRefusal: No"
GOOD_VERDICT = {"safety": "Unsafe", "categories": ["Violent"], "refusal": False, "parse_ok": True, "raw": GOOD_TEXT}
GARBAGE = "lol I am not a guard"


def _chat(content):
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def _reply(kind, path, body):
    """(status, body bytes) of a stand-in endpoint failing as `kind` (or answering well: kind 'good')."""
    n = len(body.get("items", [None]))
    replies = {
        "500": (500, b'{"detail": "boom"}'),
        "not JSON": (200, b"{not json"),
        "wrong shape": (200, json.dumps({"result": "ok"} if path == "/v1/moderate" else {"choices": []})),
        "wrong count": (200, json.dumps({"verdicts": [GOOD_VERDICT] * (n - 1)} if path == "/v1/moderate"
                                        else {"choices": [{"message": {"role": "assistant"}}]})),
        "verdicts lacking fields": (200, json.dumps({"verdicts": [{"safety": "Safe"}] * n}
                                                    if path == "/v1/moderate" else _chat(None))),
        "unknown label": (200, json.dumps({"verdicts": [{**GOOD_VERDICT, "safety": "Fine"}] * n}
                                          if path == "/v1/moderate" else {"choices": "Safety: Safe"})),
        "garbage guard text": (200, json.dumps(
            {"verdicts": [{"safety": None, "categories": [], "refusal": None, "parse_ok": False, "raw": GARBAGE}] * n}
            if path == "/v1/moderate" else _chat(GARBAGE))),
        "good": (200, json.dumps({"verdicts": [GOOD_VERDICT] * n} if path == "/v1/moderate" else _chat(GOOD_TEXT))),
        "rm wrong count": (200, json.dumps({"scores": [1.0] * (n - 1)})),
        "rm not a number": (200, json.dumps({"scores": ["high"] * n})),
        "rm NaN": (200, b'{"scores": [' + b", ".join([b"NaN"] * n) + b"]}"),
        "rm good": (200, json.dumps({"scores": [2.5] * n})),
    }
    status, data = replies[kind]
    return status, data.encode() if isinstance(data, str) else data


class StandIn:
    """A local HTTP endpoint answering every POST as `kind`; `hung` accepts and never answers; `refused`
    is a port nothing listens on."""

    def __init__(self, kind):
        self.kind, self.server, self.sock = kind, None, None
        if kind == "hung":
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(64)
            self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        elif kind == "refused":
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            sock.close()
        else:
            class Handler(BaseHTTPRequestHandler):
                def do_POST(self):  # noqa: N802 - http.server's naming
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    status, data = _reply(kind, self.path, body)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

                def log_message(self, *args):
                    pass

            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
            self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.sock is not None:
            self.sock.close()


TRANSPORT = ["hung", "refused", "500"]
MALFORMED = ["not JSON", "wrong shape", "wrong count", "verdicts lacking fields", "unknown label"]
FAILURES = TRANSPORT + MALFORMED + ["garbage guard text"]
ITEMS = [ModerationItem([{"role": "user", "content": f"question {i}"}], f"answer {i}") for i in range(4)]
HELPFULNESS = [-20.0, -3.0, 0.0, 3.0, 50.0, 1e6]
ALL_RULES = [RewardRules(controversial_is_unsafe=c, unparsable=u) for c in (True, False) for u in ("unsafe", "safe")]
RECIPES = {"hybrid": hybrid, "guard_only": guard_only}


def _rewards(recipe, verdict, rules):
    """The recipe's reward for one verdict at every helpfulness value."""
    inputs = RewardInputs([verdict] * len(HELPFULNESS), [None] * len(HELPFULNESS), list(HELPFULNESS))
    return RECIPES[recipe](inputs, rules).total


@pytest.fixture(scope="module")
def verdicts():
    """(failure, protocol, fallback) -> (the verdicts RemoteGuardScorer returned, its counters)."""
    out = {}
    for failure in FAILURES:
        endpoint = StandIn(failure)
        for protocol in ("saferl", "openai"):
            for fallback in ("unsafe", "safe"):
                # A short timeout only for the endpoint that never answers: the others must be read as
                # errors, not time out on a loaded machine (a 0.3 s budget did in a loaded CI run).
                guard = RemoteGuardScorer([endpoint.url], protocol=protocol,
                                          timeout_s=0.3 if failure == "hung" else 10.0, retries=1,
                                          backoff_s=0.01, fallback=fallback)
                out[failure, protocol, fallback] = guard.moderate(ITEMS), guard.stats()
        endpoint.close()
    return out


CASES = [(f, p, fb) for f in FAILURES for p in ("saferl", "openai") for fb in ("unsafe", "safe")]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_no_failure_scores_better_than_the_configured_fallback(verdicts, case):
    failure, protocol, fallback = case
    got, stats = verdicts[case]
    assert len(got) == len(ITEMS)
    if failure == "garbage guard text":  # a model's answer that does not parse: the unparsable rule
        assert all(not v.parse_ok and not v.fallback for v in got) and stats["fallbacks"] == 0
        assert stats["parse_failures"] == len(ITEMS)
    else:  # no judgement came back: marked stand-ins, counted, and a malformed 200 counted as an error
        assert all(v.fallback for v in got) and stats["fallbacks"] == len(ITEMS)
        assert stats["parse_failures"] == 0
        tries = len(ITEMS) * 2 if protocol == "openai" else 2  # one request per item, or one per batch
        assert stats["timeouts" if failure == "hung" else "errors"] == tries and stats["retries"] == tries // 2
    label = SafetyLabel.UNSAFE if fallback == "unsafe" else SafetyLabel.SAFE
    configured = GuardVerdict(label, (), refusal=False)  # the configured fallback, as if a guard had said it
    unparsable = GuardVerdict(None, parse_ok=False)
    for rules in ALL_RULES:
        for recipe in RECIPES:
            unparsable_reward = _rewards(recipe, unparsable, rules)
            for verdict in got:
                reward = _rewards(recipe, verdict, rules)
                assert all(r <= u for r, u in zip(reward, unparsable_reward))
                if failure == "garbage guard text":
                    continue
                assert all(r <= c for r, c in zip(reward, _rewards(recipe, configured, rules)))
                if fallback == "unsafe":  # the peers' reward 0 would be +10 over this
                    assert reward == ([min(-10.0, h) for h in HELPFULNESS] if recipe == "hybrid"
                                      else [0.0] * len(HELPFULNESS))
    default = RewardRules()  # unparsable unsafe: every failure is capped like an unsafe answer
    for verdict in got:
        assert max(_rewards("hybrid", verdict, default)) <= -10.0


@pytest.mark.parametrize("failure", MALFORMED)
def test_a_malformed_reply_is_retried_on_the_next_endpoint(failure):
    """A 200 of the wrong shape is an error like a 5xx: counted, and the next endpoint gives the verdict."""
    bad, good = StandIn(failure), StandIn("good")
    for protocol in ("saferl", "openai"):
        guard = RemoteGuardScorer([bad.url, good.url], protocol=protocol, timeout_s=2.0, retries=1,
                                  backoff_s=0.01)
        got = guard.moderate(ITEMS)
        assert all(v.safety is SafetyLabel.UNSAFE and v.categories == ("Violent",) and not v.fallback
                   for v in got)
        stats = guard.stats()
        # Round-robin: the batch, or every other item, tried the malformed endpoint first.
        expected = 1 if protocol == "saferl" else len(ITEMS) // 2
        assert stats["errors"] == stats["retries"] == expected and stats["fallbacks"] == 0
    bad.close()
    good.close()


def test_fallback_safe_warns_at_start(capsys):
    RemoteGuardScorer(["http://127.0.0.1:9"], fallback="unsafe")
    assert capsys.readouterr().out == ""
    RemoteGuardScorer(["http://127.0.0.1:9"], fallback="safe")
    out = capsys.readouterr().out
    assert "warning" in out and "guard.fallback=safe" in out and "reward.rules.unparsable" in out


RM_FAILURES = ["hung", "refused", "500", "not JSON", "rm wrong count", "rm not a number", "rm NaN"]


def _rollouts():
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"q{i}"}], kind="benign") for i in range(4)]
    return [Rollout(p, [1], [2], [0.0], f"a{i}", "", f"a{i}", "stop", group=i) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("failure", RM_FAILURES)
def test_an_rm_failure_never_beats_a_refusal_under_hybrid(failure):
    """The driver's scoring path with remote clients: the RM fails (fallback_score 100, far above any real
    score), the guard calls answers Safe, Unsafe or a refusal. Each fallback-scored rollout is marked and
    counted, an unsafe one keeps its -10 cap and a safe one earns no more than a refusal (-5)."""
    rm_endpoint = StandIn(failure)
    texts = {"safe": "Safety: Safe\nCategories: None\nRefusal: No",
             "unsafe": "Safety: Unsafe\nCategories: Violent\nRefusal: No",
             "refusal": "Safety: Safe\nCategories: None\nRefusal: Yes"}

    class PerAnswer(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = body["messages"][-1]["content"]
            kind = ["safe", "unsafe", "refusal", "safe"][int(answer.rsplit("a", 1)[-1])]
            data = json.dumps(_chat(texts[kind])).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    guard_server = ThreadingHTTPServer(("127.0.0.1", 0), PerAnswer)
    threading.Thread(target=guard_server.serve_forever, daemon=True).start()
    guard = GuardGroup(ActorGroup(RemoteGuardScorer, 1, executor="local", kwargs=dict(
        urls=[f"http://127.0.0.1:{guard_server.server_address[1]}"], protocol="openai")))
    rm = HelpfulnessGroup(ActorGroup(RemoteHelpfulnessScorer, 1, executor="local", kwargs=dict(
        urls=[rm_endpoint.url], timeout_s=0.3 if failure == "hung" else 10.0, retries=1, backoff_s=0.01,
        fallback_score=100.0)))
    inputs = RewardInputs.of(score_rollouts(_rollouts(), guard, rm))
    assert inputs.helpfulness == [100.0] * 4 and inputs.helpfulness_fallback == [True] * 4
    stats = rm.group.call("stats")[0]
    assert stats["fallbacks"] == 4 and stats["timeouts" if failure == "hung" else "errors"] == 2
    out = hybrid(inputs, RewardRules())
    assert out.total == [-5.0, -10.0, -5.0, -5.0] and out.metrics["helpfulness_fallbacks"] == 4.0
    # The honest path on the same answers: what the RM says, gated; a fallback never beats a refusal's cap.
    honest = hybrid(RewardInputs(inputs.answer_verdicts, inputs.thinking_verdicts, [100.0] * 4), RewardRules())
    assert honest.total == [100.0, -10.0, -5.0, 100.0] and honest.metrics["helpfulness_fallbacks"] == 0.0
    guard_server.shutdown()
    rm_endpoint.close()


def test_an_rm_reply_of_the_wrong_shape_is_retried_on_the_next_endpoint():
    bad, good = StandIn("rm wrong count"), StandIn("rm good")
    rm = RemoteHelpfulnessScorer([bad.url, good.url], retries=1, backoff_s=0.01, fallback_score=0.0)
    pairs = [([{"role": "user", "content": "q"}], "a")] * 3
    assert rm.score_with_fallbacks(pairs) == [((2.5,), False)] * 3
    assert rm.stats()["errors"] == 1 and rm.stats()["fallbacks"] == 0
    assert rm.score(pairs) == [2.5] * 3
    bad.close()
    good.close()
