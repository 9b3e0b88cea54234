"""Clients of remote scorers: a pool of HTTP endpoints with timeouts, retries, back-off and counters.

`EndpointPool` does the transport for `RemoteGuardScorer` (saferl.guard.remote) and
`RemoteHelpfulnessScorer` (below): JSON over HTTP, a bearer token from the environment, round-robin over the
endpoints with each retry moving to the next one, and counters the driver logs every step.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class EndpointPool:
    """POST JSON to a pool of endpoints: round-robin start, per-request timeout, retries with exponential
    back-off on the next endpoint, counters. Shared by the remote guard and the remote reward model."""

    def __init__(self, urls: list[str], *, token_env: str, timeout_s: float, retries: int, backoff_s: float,
                 concurrency: int, what: str) -> None:
        if not urls:
            raise ValueError(f"{what}.urls is empty: a remote {what} needs at least one endpoint")
        import httpx

        self.urls, self.what = [u.rstrip("/") for u in urls], what
        token = os.environ.get(token_env)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff_s = retries, backoff_s
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s), limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=concurrency))
        self.threads = ThreadPoolExecutor(concurrency, thread_name_prefix=f"saferl-{what}-client")
        self._next = itertools.count()
        self._lock = threading.Lock()
        self.counters = {"timeouts": 0, "errors": 0, "retries": 0, "fallbacks": 0, "parse_failures": 0,
                         "truncated": 0}

    def post(self, path: str, body: dict[str, Any], validate: Callable[[Any], T]) -> T | None:
        """`validate(reply JSON)`, or None when every try failed.

        `validate` turns the decoded reply into the caller's result and raises ValueError when its shape is
        wrong (fields missing, wrong types, a wrong number of results): such a 200 is counted as an error and
        retried on the next endpoint like a 5xx, never passed on as a judgement.
        """
        import httpx

        first = next(self._next)  # round-robin start; a retry moves on to the next endpoint
        for attempt in range(self.retries + 1):
            url = self.urls[(first + attempt) % len(self.urls)] + path
            try:
                response = self.client.post(url, json=body, headers=self.headers)
                response.raise_for_status()
                return validate(response.json())
            except httpx.TimeoutException:
                self.count("timeouts")
            except (httpx.HTTPError, ValueError):  # connection refused, 5xx, a body not JSON or of a wrong shape
                self.count("errors")
            if attempt < self.retries:
                self.count("retries")
                time.sleep(self.backoff_s * 2 ** attempt)
        return None

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)

    def check_health(self, paths: tuple[str, ...], timeout_s: float) -> dict[str, str]:
        """GET `paths` in turn on every endpoint (in parallel, `timeout_s` each); an endpoint is up when one
        answers 2xx.

        Returns {url: why} for the endpoints that are down, and raises ConnectionError naming every URL when
        none is up: a run must not train on fallback verdicts because of a wrong URL.
        """
        import httpx

        def why_down(url: str) -> str:
            reasons = []
            for path in paths:
                try:
                    response = self.client.get(url + path, headers=self.headers, timeout=timeout_s)
                except httpx.HTTPError as e:
                    reasons.append(f"GET {path}: {type(e).__name__} {e}".strip())
                    continue
                if response.is_success:
                    return ""
                reasons.append(f"GET {path}: HTTP {response.status_code}")
            return "; ".join(reasons)

        dead = {url: why for url, why in zip(self.urls, self.threads.map(why_down, self.urls)) if why}
        if len(dead) == len(self.urls):
            detail = "; ".join(f"{url} ({why})" for url, why in dead.items())
            raise ConnectionError(f"none of {self.what}.urls answers its health check: {detail}. Start the "
                                  f"{self.what} server(s) or fix {self.what}.urls")
        return dead


class RemoteHelpfulnessScorer:
    """A helpfulness RM behind `saferl serve rm`: batched POST /v1/score, `score(pairs) -> scores` like
    HelpfulnessScorer. When every try fails the batch gets `fallback_score`, or the error is raised (None).
    `score_with_fallbacks` marks each stand-in score, so the reward can tell it from a judgement (the hybrid
    recipe caps a fallback-scored rollout at the refusal cap)."""

    def __init__(self, urls: list[str], *, token_env: str = "SAFERL_RM_TOKEN", timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, fallback_score: float | None = None,
                 concurrency: int = 16, batch_size: int = 64) -> None:
        self.endpoints = EndpointPool(urls, token_env=token_env, timeout_s=timeout_s, retries=retries,
                                      backoff_s=backoff_s, concurrency=concurrency, what="helpfulness")
        self.fallback_score, self.batch_size = fallback_score, batch_size

    def score(self, pairs: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        """One score per pair, fallbacks included."""
        return [s for (s,), _ in self.score_with_fallbacks(pairs)]

    def score_with_fallbacks(self, pairs: list[tuple[list[dict[str, str]], str]]
                             ) -> list[tuple[tuple[float, ...], bool]]:
        """((score,), is the fallback) per pair: HelpfulnessScorer's shape for an RM without an ensemble (a
        remote ensemble is refused by the config checks)."""
        chunks = [pairs[i:i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]
        return [s for chunk in self.endpoints.threads.map(self._score_batch, chunks) for s in chunk]

    def _score_batch(self, pairs: list[tuple[list[dict[str, str]], str]]) -> list[tuple[tuple[float, ...], bool]]:
        body = {"items": [{"messages": messages, "response": answer} for messages, answer in pairs]}
        scores = self.endpoints.post("/v1/score", body, lambda reply: score_reply(reply, len(pairs)))
        if scores is not None:
            return [((s,), False) for s in scores]
        self.endpoints.count("fallbacks", len(pairs))
        if self.fallback_score is None:
            raise RuntimeError(f"reward-model endpoints {self.endpoints.urls} failed; set helpfulness.fallback_score "
                               "to keep training with a stand-in score instead")
        return [((self.fallback_score,), True)] * len(pairs)

    def stats(self) -> dict[str, int]:
        return self.endpoints.stats()

    def pop_compute(self) -> list[tuple[float, float]]:
        return []  # the model runs elsewhere; its time is not this process's compute

    def ready(self) -> bool:
        return True


def score_reply(reply: Any, n: int) -> list[float]:
    """The scores of a /v1/score reply, `{"scores": [n finite numbers]}`; ValueError for any other shape."""
    scores = reply.get("scores") if isinstance(reply, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        raise ValueError(f"expected {{'scores': [{n} numbers]}}, got {str(reply)[:200]}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
        raise ValueError(f"scores must be finite numbers, got {str(scores)[:200]}")
    return [float(x) for x in scores]
