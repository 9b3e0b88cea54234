"""RemoteGuardScorer: a guard that lives behind HTTP, with timeouts, retries, a fallback and counters.

Two protocols, one interface (`moderate(items) -> verdicts`, like GuardScorer, so the driver cannot tell):
- `saferl`: our own reward server (`saferl serve guard`), batched POST /v1/moderate;
- `openai`: any OpenAI-compatible chat endpoint serving a Qwen3Guard-Gen model, e.g.
  `vllm serve Qwen/Qwen3Guard-Gen-4B`; one chat completion per item (greedy), sent concurrently so the
  server's continuous batching sees them together, and parsed here.

Failure handling, per request: a timeout (`timeout_s`), then up to `retries` more tries with exponential
back-off, each on the next endpoint of the pool (round-robin spreads the load). When every try fails the
items get the configured fallback verdict (`fallback: unsafe|safe`) instead of stalling training, or the
error is raised (`fallback: error`). A 200 reply of the wrong shape (not JSON of the protocol's form, a wrong
number of verdicts, a verdict missing fields) is an error like a 5xx: counted, retried, never a verdict.
A fallback verdict is marked (`GuardVerdict.fallback`) so no failure passes for a judgement; how it counts
is `SafetyPolicy`'s fallback rule (unsafe unless reward.rules.unparsable is safe too). Counters of timeouts,
errors, retries, fallbacks, parse failures and truncated inputs are returned by `stats()` and logged by the
driver.
"""

from __future__ import annotations

from typing import Any

from saferl.guard.templates import moderation_messages, parse_verdict
from saferl.serving.client import EndpointPool
from saferl.truncation import fit_messages
from saferl.types import GuardVerdict, ModerationItem, SafetyLabel

# The fields of a verdict from `saferl serve guard` (saferl.serving.server.Verdict).
VERDICT_FIELDS = ("safety", "categories", "refusal", "parse_ok", "raw")
PROTOCOLS = ("saferl", "openai")
FALLBACKS = ("unsafe", "safe", "error")


class RemoteGuardScorer:
    def __init__(self, urls: list[str], *, protocol: str = "saferl", served_model_name: str = "guard",
                 token_env: str = "SAFERL_GUARD_TOKEN", timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, fallback: str = "unsafe", max_new_tokens: int = 32,
                 max_input_chars: int = 16_000, concurrency: int = 64, batch_size: int = 64) -> None:
        if protocol not in PROTOCOLS or fallback not in FALLBACKS:
            raise ValueError(f"protocol must be one of {PROTOCOLS} and fallback one of {FALLBACKS}")
        if fallback == "safe":  # printed where the client is built, so it is in every run's output
            print("[saferl] warning: guard.fallback=safe: when every guard endpoint fails, rollouts get a "
                  "stand-in Safe verdict; it counts as safe only if reward.rules.unparsable is safe too, "
                  "and then answers no guard judged are rewarded as safe", flush=True)
        self.endpoints = EndpointPool(urls, token_env=token_env, timeout_s=timeout_s, retries=retries,
                                      backoff_s=backoff_s, concurrency=concurrency, what="guard")
        self.urls, self.retries = self.endpoints.urls, retries
        self.protocol, self.model_name, self.fallback = protocol, served_model_name, fallback
        self.max_new_tokens, self.max_input_chars = max_new_tokens, max_input_chars
        self.batch_size = batch_size

    # ---- the role interface ---------------------------------------------------------------------------

    def moderate(self, items: list[ModerationItem]) -> list[GuardVerdict]:
        """One verdict per item, never blocking longer than (retries + 1) x timeout plus back-off."""
        if not items:
            return []
        items = [self._truncate(it) for it in items]
        if self.protocol == "saferl":
            chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
            verdicts = [v for chunk in self.endpoints.threads.map(self._moderate_batch, chunks) for v in chunk]
        else:
            verdicts = list(self.endpoints.threads.map(self._moderate_one, items))
        self.endpoints.count("parse_failures", sum(not v.parse_ok for v in verdicts))
        return verdicts

    def stats(self) -> dict[str, int]:
        return self.endpoints.stats()

    def pop_compute(self) -> list[tuple[float, float]]:
        return []  # the model runs elsewhere; its time is not this process's compute

    def ready(self) -> bool:
        return True

    # ---- one request ----------------------------------------------------------------------------------

    def _moderate_batch(self, items: list[ModerationItem]) -> list[GuardVerdict]:
        body = {"items": [{"messages": it.messages, "response": it.response} for it in items]}
        verdicts = self.endpoints.post("/v1/moderate", body, lambda reply: moderate_reply(reply, len(items)))
        if verdicts is None:
            return [self._fallback(it) for it in items]
        return verdicts

    def _moderate_one(self, item: ModerationItem) -> GuardVerdict:
        body = {"model": self.model_name, "messages": moderation_messages(item.messages, item.response),
                "temperature": 0.0, "max_tokens": self.max_new_tokens}
        text = self.endpoints.post("/v1/chat/completions", body, chat_reply)
        if text is None:
            return self._fallback(item)
        return parse_verdict(text, "prompt" if item.response is None else "response")

    def _fallback(self, item: ModerationItem) -> GuardVerdict:
        self.endpoints.count("fallbacks")
        if self.fallback == "error":
            raise RuntimeError(f"guard endpoints {self.urls} failed {self.retries + 1} times in a row")
        label = SafetyLabel.UNSAFE if self.fallback == "unsafe" else SafetyLabel.SAFE
        return GuardVerdict(label, (), None if item.response is None else False, parse_ok=True,
                            raw=f"<fallback: {self.fallback}>", fallback=True)

    def _truncate(self, item: ModerationItem) -> ModerationItem:
        """The item cut to `max_input_chars` characters of conversation, oldest context first and keeping the
        judged text's end (saferl.truncation), and counted. Only the conversation travels: the instruction and
        format lines are rendered by the server (`saferl serve guard`, or the served model's chat template), so
        no cut here can reach them. A `saferl serve guard` server then fits its own token budget the same way
        (GuardScorer), counting those cuts on the server, not in these stats."""
        messages = moderation_messages(item.messages, item.response)
        if _chars(messages) <= self.max_input_chars:
            return item
        self.endpoints.count("truncated")
        fitted = fit_messages(messages, self.max_input_chars, _chars, lambda text, n: text[n:])
        if item.response is None:
            return ModerationItem(fitted, None)
        return ModerationItem(fitted[:-1], fitted[-1]["content"])


def _chars(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def moderate_reply(reply: Any, n: int) -> list[GuardVerdict]:
    """The verdicts of a /v1/moderate reply: `{"verdicts": [n verdicts]}`, each with the server's fields and
    types; ValueError for any other shape (the caller retries, then falls back)."""
    verdicts = reply.get("verdicts") if isinstance(reply, dict) else None
    if not isinstance(verdicts, list) or len(verdicts) != n:
        raise ValueError(f"expected {{'verdicts': [{n} verdicts]}}, got {str(reply)[:200]}")
    return [_verdict(v) for v in verdicts]


def _verdict(v: Any) -> GuardVerdict:
    if not isinstance(v, dict) or any(k not in v for k in VERDICT_FIELDS):
        raise ValueError(f"a verdict needs the fields {VERDICT_FIELDS}, got {str(v)[:200]}")
    safety, categories, refusal, parse_ok, raw = (v[k] for k in VERDICT_FIELDS)
    if not (isinstance(parse_ok, bool) and isinstance(raw, str) and isinstance(refusal, bool | None)
            and isinstance(categories, list) and all(isinstance(c, str) for c in categories)):
        raise ValueError(f"a verdict field has the wrong type: {str(v)[:200]}")
    if parse_ok and safety is None:  # a parsed verdict has a label
        raise ValueError(f"a verdict with parse_ok true and no safety label: {str(v)[:200]}")
    label = SafetyLabel(safety) if safety is not None else None  # ValueError for an unknown label
    return GuardVerdict(label, tuple(categories), refusal, parse_ok, raw)


def chat_reply(reply: Any) -> str:
    """The text of an OpenAI chat completion, `choices[0].message.content`; ValueError for any other shape.
    An unparsable text is the model's answer (counted as a parse failure), not a failed request."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    message = choices[0].get("message") if isinstance(choices, list) and choices and isinstance(
        choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise ValueError(f"expected choices[0].message.content to be text, got {str(reply)[:200]}")
    return content
