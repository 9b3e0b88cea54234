"""Many live moderation streams on one Stream guard: the state behind `saferl serve stream-guard`.

Owns `StreamService`: streams opened on a conversation (the query verdict), extended by tokens or text (a
verdict per token plus the debounced decision so far), rolled back and closed, all on one `StreamBatch`. A
single worker thread owns the model and the batch; callers submit operations and get futures. Each tick
the worker takes every request waiting, plus those that keep arriving (each within `max_wait_s` of the
last, for at most `TICK_WAIT_CAP` times that; not at all once every open stream has asked), applies closes
and rollbacks, prefills all new streams in one forward, then feeds every stream's new tokens in one
forward. `append_many` submits appends to many streams as one tick's work.

Choices and shortcuts:
- The prefix is the conversation (ending with a user turn) rendered by the guard's own chat template with
  the non-thinking generation prompt (`encode_prompt`); the tokens appended are the assistant's answer.
  Only appended tokens enter the decision (the header and think scaffold are read, not judged), as in CARE.
- Text is tokenized with the guard's tokenizer, so any LLM's output can be moderated. A chunk boundary may
  split what the tokenizer would merge, so each text append re-tokenizes the stream's whole text and rolls
  the stream back to the first token that changed (`rolled_back` in the reply): the verdicts always equal
  those of the whole text tokenized at once. A stream takes text or tokens, not both.
- The decision is `saferl.guard.decisions.debounce` over the answer's labels (recomputed only when a new
  adjacent pair flags and the decision can still change, or after a rollback), with `is_unsafe` under
  `mode` for `flagged`.
- Bounds: at most `max_streams` open (more: 429), at most `max_stream_tokens` per stream, prefix included
  (more: 400); a stream idle for its timeout is closed at the next tick and then answers 404 saying so.
  Ids of expired streams are remembered (the last 10 000) only to say "expired" rather than "unknown".
- One operation per stream per tick: a second request on the same stream waits for the next tick, so a
  client's requests apply in the order sent.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from saferl.guard.conversation import encode_prompt, role_tokens
from saferl.guard.decisions import Detection, debounce, is_unsafe
from saferl.guard.stream import StreamBatch
from saferl.guard.stream_model import Qwen3StreamGuard
from saferl.types import SafetyLabel, StreamVerdict

EXPIRED_REMEMBERED = 10_000
TICK_WAIT_CAP = 10  # a tick gathers requests for at most this many times max_wait_s


class StreamError(Exception):
    """A request the service refuses; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Stream:
    """One open stream: the answer so far (tokens, their labels and categories) and the decision."""

    id: str
    sid: int  # its row id in the StreamBatch
    prefix: int  # prefix tokens (the rendered conversation)
    idle_timeout_s: float
    last_used: float
    tokens: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    text: str | None = None  # the appended text, for a stream fed text
    offsets: list[int] = field(default_factory=list)  # char offset where each token of `text` starts
    decision: Detection = Detection(None, SafetyLabel.SAFE, None)


@dataclass
class Reply:
    """What an operation returns: the verdicts of the tokens just read, the decision, the stream's length."""

    id: str
    length: int  # answer tokens in the stream
    verdicts: list[StreamVerdict]
    decision: Detection
    flagged: bool
    rolled_back: int = 0  # tokens rolled back before feeding (text appends)
    tokens: list[int] = field(default_factory=list)  # the ids read, one per response verdict
    prefix: int = 0  # prefix tokens (the rendered conversation), given when the stream opens


class StreamService:
    """Open streams on one Stream guard, fed in ticks by a worker thread (see the module docstring).

    Args:
        model: the Stream guard.
        tokenizer: its tokenizer (chat template and text).
        max_streams: streams open at once.
        max_stream_tokens: tokens one stream may hold, prefix included.
        idle_timeout_s: a stream without requests this long is closed (a stream may ask for less).
        rule, mode: debouncing rule ("official" | "paper") and strict/loose for `flagged`.
        max_wait_s: how long a tick waits, after its latest request, for another to join (unless every open
            stream has asked; at most `TICK_WAIT_CAP` times this in all).
    """

    def __init__(self, model: Qwen3StreamGuard, tokenizer: Any, *, max_streams: int = 256,
                 max_stream_tokens: int = 8192, idle_timeout_s: float = 300.0, rule: str = "official",
                 mode: str = "strict", max_wait_s: float = 0.002):
        if max_streams < 1 or max_stream_tokens < 2 or idle_timeout_s <= 0:
            raise ValueError("max_streams >= 1, max_stream_tokens >= 2 and idle_timeout_s > 0 are required")
        self.model, self.tokenizer = model, tokenizer
        self.vocab = model.config.vocab_size
        self.batch = StreamBatch(model, role_tokens(tokenizer), pad_id=tokenizer.pad_token_id or 0)
        self.max_streams, self.max_stream_tokens, self.idle_timeout_s = max_streams, max_stream_tokens, idle_timeout_s
        self.rule, self.mode, self.max_wait_s = rule, mode, max_wait_s
        self.streams: dict[str, Stream] = {}
        self.expired: OrderedDict[str, float] = OrderedDict()
        self.ticks = self.fed = self.opened = 0
        self._queue: queue.Queue[list[tuple[str, tuple, Future]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="saferl-stream-guard", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the API (any thread)

    def open(self, messages: list[dict[str, str]], idle_timeout_s: float | None = None) -> Future[Reply]:
        return self._submit("open", messages, idle_timeout_s)

    def append(self, stream_id: str, tokens: list[int] | None = None, text: str | None = None) -> Future[Reply]:
        return self._submit("append", stream_id, tokens, text)

    def rollback(self, stream_id: str, n: int) -> Future[Reply]:
        return self._submit("rollback", stream_id, n)

    def close(self, stream_id: str) -> Future[Reply]:
        return self._submit("close", stream_id)

    def stats(self) -> dict[str, float]:
        return {"open_streams": len(self.streams), "max_streams": self.max_streams, "ticks": self.ticks,
                "tokens_fed": self.fed, "streams_opened": self.opened}

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def append_many(self, appends: list[tuple[str, list[int] | None, str | None]]) -> list[Future[Reply]]:
        """`append` to several streams at once, (stream id, tokens, text) each, applied in one tick (one forward):
        what a chat server decoding many streams in lockstep sends after each step. A stream named twice
        takes its second append in the next tick."""
        requests: list[tuple[str, tuple, Future]] = [("append", tuple(a), Future()) for a in appends]
        self._queue.put(requests)
        return [future for _, _, future in requests]

    def _submit(self, op: str, *args: Any) -> Future[Reply]:
        future: Future[Reply] = Future()
        self._queue.put([(op, args, future)])
        return future

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        carry: list[tuple[str, tuple, Future]] = []
        while True:
            try:
                first = carry or self._queue.get(timeout=1.0)
            except queue.Empty:
                self._expire(time.monotonic())
                continue
            if first is None:
                return
            requests, carry = list(first), []
            start = time.monotonic()
            while not self._everyone_asked(requests):
                wait = min(self.max_wait_s, start + TICK_WAIT_CAP * self.max_wait_s - time.monotonic())
                try:
                    item = self._queue.get(timeout=max(0.0, wait))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this tick
                    break
                requests += item
            try:
                carry = self._tick(requests)
            except Exception as e:  # noqa: BLE001 - a bug must fail this tick's requests, not hang them
                for _, _, future in requests:
                    if not future.done():
                        future.set_exception(e)

    def _everyone_asked(self, requests: list[tuple[str, tuple, Future]]) -> bool:
        """Whether every open stream has a request in this tick: then no other can join it, and it starts at
        once instead of waiting `max_wait_s` (a lone stream never waits)."""
        return self.streams.keys() <= {args[0] for op, args, _ in requests if op != "open"}

    def _tick(self, requests: list[tuple[str, tuple, Future]]) -> list[tuple[str, tuple, Future]]:
        """Apply one tick's requests; returns those postponed to the next tick (a second one per stream)."""
        now = time.monotonic()
        self._expire(now)
        self.ticks += 1
        busy: set[str] = set()
        later, opens, feeds = [], [], {}
        for op, args, future in requests:
            sid = args[0] if op != "open" else None
            if sid is not None and sid in busy:
                later.append((op, args, future))
                continue
            try:
                if op == "open":
                    opens.append((self._check_open(*args), future))
                    continue
                stream = self._get(sid)
                busy.add(sid)
                stream.last_used = now
                if op == "close":
                    self.batch.drop([stream.sid])
                    del self.streams[sid]
                    future.set_result(Reply(sid, len(stream.tokens), [], stream.decision, self._flagged(stream)))
                elif op == "rollback":
                    future.set_result(self._rollback(stream, args[1]))
                else:
                    feeds[sid] = (self._plan_append(stream, args[1], args[2]), future)
            except StreamError as e:
                future.set_exception(e)
        self._open_all(opens, now)
        self._feed_all(feeds)
        return later

    def _expire(self, now: float) -> None:
        gone = [s for s in self.streams.values() if now - s.last_used > s.idle_timeout_s]
        if gone:
            self.batch.drop([s.sid for s in gone])
        for s in gone:
            del self.streams[s.id]
            self.expired[s.id] = s.idle_timeout_s
        while len(self.expired) > EXPIRED_REMEMBERED:
            self.expired.popitem(last=False)

    def _get(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        if stream_id in self.expired:
            raise StreamError(404, f"stream {stream_id} expired: it was closed after {self.expired[stream_id]:g} s "
                              "without a request; open a new stream")
        raise StreamError(404, f"no open stream {stream_id} (closed, or never opened)")

    def _check_open(self, messages: list[dict[str, str]], idle_timeout_s: float | None) -> tuple[list[int], float]:
        if messages[-1]["role"] != "user":
            raise StreamError(400, f"the conversation must end with a user turn, not {messages[-1]['role']!r}")
        if idle_timeout_s is not None and not 0 < idle_timeout_s <= self.idle_timeout_s:
            raise StreamError(400, f"idle_timeout_s must be in (0, {self.idle_timeout_s:g}] (the server's "
                              "--idle-timeout-s)")
        prefix = encode_prompt(self.tokenizer, messages)
        if len(prefix) >= self.max_stream_tokens:
            raise StreamError(400, f"the conversation is {len(prefix)} guard tokens; a stream holds at most "
                              f"{self.max_stream_tokens} (--max-stream-tokens)")
        return prefix, idle_timeout_s or self.idle_timeout_s

    def _open_all(self, opens: list[tuple[tuple[list[int], float], Future]], now: float) -> None:
        room = self.max_streams - len(self.streams)
        for _, future in opens[room:]:
            future.set_exception(StreamError(429, f"{self.max_streams} streams are open, the most this server "
                                             "holds (--max-streams): close one or retry later"))
        opens = opens[: max(room, 0)]
        if not opens:
            return
        steps = self.batch.add([prefix for (prefix, _), _ in opens])
        for ((prefix, timeout), future), (sid, step) in zip(opens, steps.items()):
            stream = Stream(secrets.token_urlsafe(12), sid, len(prefix), timeout, now)
            self.streams[stream.id] = stream
            self.opened += 1
            query = [v for v in step.verdicts if v.role == "user"]
            future.set_result(Reply(stream.id, 0, query, stream.decision, False, prefix=len(prefix)))

    def _plan_append(self, stream: Stream, tokens: list[int] | None, text: str | None) -> tuple[int, list[int]]:
        """(tokens to roll back first, tokens to feed) for an append, checked."""
        if (tokens is None) == (text is None):
            raise StreamError(400, "give exactly one of `tokens` and `text`")
        back = 0
        if text is not None:
            if stream.text is None and stream.tokens:
                raise StreamError(400, "this stream was fed token ids; it cannot take text too")
            whole = (stream.text or "") + text
            encoded = self.tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"]
            same = 0
            while same < min(len(ids), len(stream.tokens)) and ids[same] == stream.tokens[same]:
                same += 1
            back, tokens = len(stream.tokens) - same, ids[same:]
            stream_text, offsets = whole, [start for start, _ in encoded["offset_mapping"]]
        else:
            if stream.text is not None:
                raise StreamError(400, "this stream was fed text; it cannot take token ids too")
            bad = [t for t in tokens if not 0 <= t < self.vocab]
            if bad:
                raise StreamError(400, f"token ids {bad[:5]} are outside the guard's vocabulary (0..{self.vocab - 1})")
            stream_text, offsets = None, []
        size = stream.prefix + len(stream.tokens) - back + len(tokens)
        if size > self.max_stream_tokens:
            raise StreamError(400, f"the stream would hold {size} tokens, more than {self.max_stream_tokens} "
                              "(--max-stream-tokens)")
        if stream_text is not None:
            stream.text, stream.offsets = stream_text, offsets
        return back, list(tokens)

    def _rollback(self, stream: Stream, n: int) -> Reply:
        if not 0 <= n <= len(stream.tokens):
            raise StreamError(400, f"stream {stream.id} holds {len(stream.tokens)} answer tokens: cannot roll "
                              f"back {n}")
        self._forget(stream, n)
        if stream.text is not None:
            stream.text = stream.text[: stream.offsets[len(stream.tokens)]] if n else stream.text
            stream.offsets = stream.offsets[: len(stream.tokens)]
        return Reply(stream.id, len(stream.tokens), [], stream.decision, self._flagged(stream))

    def _forget(self, stream: Stream, n: int) -> None:
        if n == 0:
            return
        self.batch.rollback(stream.sid, n)
        keep = len(stream.tokens) - n
        del stream.tokens[keep:], stream.labels[keep:], stream.categories[keep:]
        if stream.decision.index is not None and stream.decision.index >= keep:
            stream.decision = debounce(stream.labels, self.rule, stream.categories)

    def _feed_all(self, feeds: dict[str, tuple[tuple[int, list[int]], Future]]) -> None:
        for sid, ((back, _), _) in feeds.items():
            self._forget(self.streams[sid], back)
        chunks = {self.streams[sid].sid: tokens for sid, ((_, tokens), _) in feeds.items() if tokens}
        steps = self.batch.feed(chunks) if chunks else {}
        for sid, ((back, tokens), future) in feeds.items():
            stream = self.streams[sid]
            step = steps.get(stream.sid)
            verdicts = step.verdicts if step is not None else []
            start = len(stream.labels)
            stream.tokens += tokens
            stream.labels += [v.risk for v in verdicts]
            stream.categories += [v.category for v in verdicts]
            self.fed += len(tokens)
            pairs = range(max(start, 1), len(stream.labels))
            if self._may_change(stream.decision) and any(
                    debounce(stream.labels[i - 1 : i + 1], self.rule).index is not None for i in pairs):
                stream.decision = debounce(stream.labels, self.rule, stream.categories)
            future.set_result(Reply(sid, len(stream.tokens), verdicts, stream.decision, self._flagged(stream),
                                    back, tokens))

    def _may_change(self, decision: Detection) -> bool:
        """Whether appending tokens can change a stream's decision: not once it holds the rule's final answer
        (the first pair that flags under `paper`; the first Unsafe pair under `official`, which a later
        Unsafe pair overrides only when the decision so far is Controversial). Skipping the recomputation
        keeps a tick's cost flat in stream length (it is O(length) per stream)."""
        return decision.index is None or (self.rule == "official" and decision.label is SafetyLabel.CONTROVERSIAL)

    def _flagged(self, stream: Stream) -> bool:
        return stream.decision.index is not None and is_unsafe(stream.decision.label, self.mode)

