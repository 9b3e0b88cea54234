"""CARE at inference: a Stream guard watches every new token; a debounced detection rolls the buffer back.

Owns the decoding loop of CARE (spec/qwen3guard.md §6: detect -> roll back -> intervene; buffer 40 tokens, at
most 5 retries): `care_generate` decodes many conversations together with the policy's own KV cache, token by
token (greedy or sampled, one seeded random stream per conversation), while `GuardWatch` feeds each new token
to the Qwen3Guard-Stream model (`saferl.guard.stream.StreamBatch`, many conversations per forward).
The per-conversation bookkeeping (`ResponseState`: what the user has seen, what the buffer holds, retries,
wait tokens) is pure Python; `PolicyBatch` (saferl.policy_cache) is the policy's cache.

Choices and shortcuts:
- Buffer: the newest `buffer_tokens` tokens are held back; a token reaches the user once the guard has read
  it and `buffer_tokens` later tokens without a detection (or when the answer ends clean).
- Detection: the guard's response-head label of each new token with the previous visible token's,
  debounced by `saferl.guard.decisions.debounce` over that pair (`rule`, default the official one: two
  Unsafe, or two Controversial, in a row); `mode` strict (default) acts on Controversial too, loose does
  not. Only generated tokens count (the assistant header and think scaffold are read but not judged).
- Roll back: the whole buffer is discarded (back to the last token the user has seen). Rolling back only
  the flagged pair would keep the tokens that led there ("Sure, here is how to hurt ..." in the toy world)
  and the policy would carry on the same way; the buffer is the most that can be undone unseen.
- Intervention: from the rollback point the policy resamples at `retry_temperature` (1.0 by default, so a
  greedy first attempt can change), continuing its own seeded random stream (so each retry draws new
  samples and the run stays reproducible). Optionally `intervention_text` is inserted into the policy's
  context at the rollback point (once per rollback point), hidden from the user and from the guard: the
  place for a CARE-style introspection note with a model that understands one. With neither, CARE is
  guard-checked rejection sampling of the buffer window.
- Retries exhausted (`max_retries` rollbacks, then a further detection): `on_exhausted="refuse"` (default)
  stops the answer there and appends `fallback_text` after what the user has already seen (never retracted);
  `"keep"` lets the last attempt run to its end unwatched.
- Wait tokens of a response = tokens the policy generated that never reach the user: every token discarded
  by a rollback, plus, with the fallback, the flagged last attempt's buffer. A response without rollback
  waits 0. (The constant display lag of the buffer itself is not counted: it is not caused by rollbacks.)
- The policy and the guard must share one vocabulary (true of Qwen3 and Qwen3Guard; checked): the guard
  reads the policy's token ids directly. Non-thinking chat only (`enable_thinking=False` templates).
- The policy's cache is a transformers `DynamicCache` with an attention mask: a rollback masks the dropped
  columns out (they stay until finished rows are dropped and the cache is compacted), and positions continue
  per row. A guard stream is rolled back by opening it again on prefix + seen tokens (`StreamBatch` has no
  rewind); readings are causal, so the re-read prefix gives the same labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from saferl.guard.decisions import debounce, is_unsafe
from saferl.policy_cache import PolicyBatch, sample_tokens

if TYPE_CHECKING:
    import torch

    from saferl.guard.conversation import RoleTokens
    from saferl.guard.stream import StreamBatch
    from saferl.guard.stream_model import Qwen3StreamGuard


@dataclass(frozen=True)
class CareSettings:
    """CARE and decoding settings; the defaults follow the Qwen3Guard report's CARE setup.

    Attributes:
        buffer_tokens: tokens held back from the user (the rollback window).
        max_retries: rollbacks per response before `on_exhausted` applies.
        on_exhausted: "refuse" (append `fallback_text`, stop) or "keep" (the last attempt runs on unwatched).
        fallback_text: the refusal shown when retries are exhausted.
        intervention_text: text put into the policy's context at a rollback point ("" = none).
        retry_temperature: sampling temperature after a rollback.
        mode: "strict" (Controversial pairs trigger too) or "loose" (only Unsafe pairs).
        rule: debouncing rule, "official" or "paper" (`saferl.guard.decisions.debounce`).
        temperature: first-attempt temperature (0 = greedy).
        top_p: nucleus sampling mass.
        max_new_tokens: longest answer in tokens (per attempt; the user never sees more).
    """

    buffer_tokens: int = 40
    max_retries: int = 5
    on_exhausted: str = "refuse"
    fallback_text: str = "I'm sorry, but I can't help with that."
    intervention_text: str = ""
    retry_temperature: float = 1.0
    mode: str = "strict"
    rule: str = "official"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if self.on_exhausted not in ("refuse", "keep"):
            raise ValueError(f"on_exhausted must be 'refuse' or 'keep', got {self.on_exhausted!r}")
        if self.buffer_tokens < 0 or self.max_retries < 0 or self.max_new_tokens < 1:
            raise ValueError("buffer_tokens and max_retries must be >= 0 and max_new_tokens >= 1")


# ---------------------------------------------------------------- pure bookkeeping of one response


@dataclass
class ResponseState:
    """One response in progress. `committed` has reached the user; `pending` is the buffer; `labels` holds
    the guard's label of every visible (committed + pending) token."""

    committed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    generated: int = 0  # tokens sampled over all attempts
    retries: int = 0  # rollbacks done
    rolled_back: list[list[int]] = field(default_factory=list)  # the discarded buffer of each rollback
    rollback_at: list[int] = field(default_factory=list)  # len(committed) at each rollback
    detections: int = 0  # debounced detections, including one that exhausted the retries
    fallback: bool = False  # the fallback text replaced the buffer
    flagged: bool = False  # retries exhausted with on_exhausted="keep": a flagged attempt was delivered
    finish_reason: str = ""  # stop | length | fallback

    @property
    def visible(self) -> int:
        return len(self.committed) + len(self.pending)

    def push(self, token: int) -> None:
        """A newly sampled token enters the buffer."""
        self.pending.append(token)
        self.generated += 1

    def observe(self, label: str, rule: str = "official", mode: str = "strict") -> bool:
        """Record the guard's label of the newest token; True when it and the previous visible token form a
        debounced detection that counts under `mode`."""
        self.labels.append(label)
        hit = debounce(self.labels[-2:], rule) if len(self.labels) > 1 else None
        if hit is not None and hit.index is not None and is_unsafe(hit.label, mode):
            self.detections += 1
            return True
        return False

    def release(self, buffer_tokens: int) -> list[int]:
        """Move the tokens beyond the newest `buffer_tokens` to the user; returns them."""
        n = max(0, len(self.pending) - buffer_tokens)
        out, self.pending = self.pending[:n], self.pending[n:]
        self.committed += out
        return out

    def roll_back(self) -> list[int]:
        """Discard the buffer (and its labels); one retry used. Returns the discarded tokens."""
        out, self.pending = self.pending, []
        self.labels = self.labels[: len(self.committed)]
        self.rolled_back.append(out)
        self.rollback_at.append(len(self.committed))
        self.retries += 1
        return out

    def finish(self, reason: str) -> None:
        """End the response: the buffer goes to the user, or is dropped for the fallback."""
        self.finish_reason = reason
        if reason == "fallback":
            self.fallback = True
        else:
            self.release(0)

    @property
    def wait_tokens(self) -> int:
        """Generated tokens the user never receives (see the module docstring)."""
        return self.generated - len(self.committed)


# ---------------------------------------------------------------- the guard's streams


class GuardWatch:
    """Stream-guard readings for many conversations, one response label per fed token.

    Conversations are opened in groups (one `StreamBatch` per group); rolling a conversation back closes its
    stream and opens it again, in a new group, on the tokens that remain.

    Args:
        model: the Stream guard.
        roles: its turn-marker ids (`saferl.guard.stream.role_tokens`).
        pad_id: id for padded slots.
    """

    def __init__(self, model: Qwen3StreamGuard, roles: RoleTokens, pad_id: int = 0):
        self.model, self.roles, self.pad_id = model, roles, pad_id
        self.batches: list[StreamBatch] = []
        self.where: dict[int, tuple[int, int]] = {}  # row -> (batch index, stream id in that batch)

    def open(self, prefixes: dict[int, Sequence[int]]) -> None:
        """(Re)start the streams of these rows on their prefixes (prompt + seen response tokens)."""
        from saferl.guard.stream import StreamBatch

        self.close(row for row in prefixes if row in self.where)
        batch = StreamBatch(self.model, self.roles, self.pad_id)
        rows = list(prefixes)
        batch.prefill([prefixes[r] for r in rows])  # readings of the prefix are already known
        self.batches.append(batch)
        for sid, row in enumerate(rows):
            self.where[row] = (len(self.batches) - 1, sid)

    def feed(self, tokens: dict[int, int]) -> dict[int, str]:
        """Feed one new token per row; returns each row's response risk label at it."""
        by_batch: dict[int, dict[int, list[int]]] = {}
        for row, token in tokens.items():
            b, sid = self.where[row]
            by_batch.setdefault(b, {})[sid] = [token]
        labels = {}
        for b, chunks in by_batch.items():
            steps = self.batches[b].feed(chunks)
            back = {sid: row for row, (bb, sid) in self.where.items() if bb == b}
            for sid, step in steps.items():
                labels[back[sid]] = step.verdicts[-1].risk
        return labels

    def close(self, rows: Iterable[int]) -> None:
        """Close the streams of these rows."""
        for row in list(rows):
            b, sid = self.where.pop(row)
            self.batches[b].drop([sid])


# ---------------------------------------------------------------- the loop


@dataclass
class CareModels:
    """The policy with its tokenizer, and the Stream guard with its tokenizer and turn markers (None: off)."""

    policy: Any
    tokenizer: Any
    guard: Qwen3StreamGuard | None = None
    guard_tokenizer: Any = None
    roles: RoleTokens | None = None


def load_care_models(policy: str, stream_guard: str | None, *, device: str | None = None,
                     dtype: str = "float32") -> CareModels:
    """Load the policy (HF causal LM) and, unless `stream_guard` is None, the Stream guard; check that they
    share a vocabulary. `device` defaults to CUDA when available."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saferl.guard.conversation import role_tokens
    from saferl.guard.stream_model import load_stream_guard

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch_dtype).to(device).eval()
    if stream_guard is None:
        return CareModels(model, tokenizer)
    guard_tokenizer = AutoTokenizer.from_pretrained(stream_guard)
    if guard_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the policy {policy} and the Stream guard {stream_guard} have different vocabularies; "
                         "CARE feeds the policy's token ids to the guard and needs one vocabulary (as Qwen3 "
                         "and Qwen3Guard share)")
    guard = load_stream_guard(stream_guard, dtype=torch_dtype, device=device)
    return CareModels(model, tokenizer, guard, guard_tokenizer, role_tokens(guard_tokenizer))


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from saferl.guard.conversation import encode_prompt

    return encode_prompt(tokenizer, messages)


def care_generate(models: CareModels, conversations: Sequence[list[dict[str, str]]], seeds: Sequence[int],
                  settings: CareSettings = CareSettings(), care: bool = True,
                  on_commit: Callable[[int, list[int]], None] | None = None) -> list[ResponseState]:
    """Answer each conversation (ending with a user turn) under CARE; `care=False` decodes the same way
    without the guard (CARE off: same policy, same seeds, same first attempt).

    Args:
        models: from `load_care_models` (`models.guard` needed when `care`).
        conversations: chat messages per row; all rows are decoded as one batch.
        seeds: one per row; row r samples from `torch.Generator().manual_seed(seeds[r])`.
        on_commit: called with (row, token ids) whenever tokens reach the user, in order (a server
            streams them); never with tokens a rollback could still take back.

    Returns:
        One finished `ResponseState` per row: `committed` holds the delivered token ids (the fallback text,
        if any, is not among them; see `answer_text`).
    """
    import torch

    if care and models.guard is None:
        raise ValueError("CARE needs a Stream guard (models.guard is None)")
    if len(seeds) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
    s, tok = settings, models.tokenizer
    prompts = [chat_ids(tok, c) for c in conversations]
    policy = PolicyBatch(models.policy, prompts, pad_id=tok.pad_token_id or 0)
    gens = [torch.Generator(policy.device).manual_seed(int(seed)) for seed in seeds]
    temps = [s.temperature] * len(prompts)
    states = [ResponseState() for _ in prompts]
    anchor = [len(p) for p in prompts]  # context length at the start of the buffer window
    intervened_at = [-1] * len(prompts)  # len(committed) where the intervention text was last inserted
    intervention = tok(s.intervention_text, add_special_tokens=False)["input_ids"] if s.intervention_text else []
    watch = None
    if care:
        guard_prefix = [chat_ids(models.guard_tokenizer, c) for c in conversations]
        watch = GuardWatch(models.guard, models.roles, pad_id=models.guard_tokenizer.pad_token_id or 0)
        watch.open(dict(enumerate(guard_prefix)))
    active = list(range(len(prompts)))
    sent = [0] * len(prompts)  # committed tokens handed to on_commit
    while active:
        tokens = sample_tokens(policy.step(active), [temps[r] for r in active], s.top_p,
                               [gens[r] for r in active])
        for r, t in zip(active, tokens):
            states[r].push(t)
            policy.append(r, [t])
        labels = watch.feed({r: t for r, t in zip(active, tokens) if r in watch.where}) if watch else {}
        finished, rollbacks = [], []
        for r, t in zip(active, tokens):
            st = states[r]
            if r in labels and st.observe(labels[r], s.rule, s.mode):
                if st.retries < s.max_retries:
                    rollbacks.append(r)
                    continue
                if s.on_exhausted == "refuse":
                    st.finish("fallback")
                    finished.append(r)
                    continue
                st.flagged = True
                watch.close([r])  # type: ignore[union-attr]
            if t == tok.eos_token_id or st.visible >= s.max_new_tokens:
                st.finish("stop" if t == tok.eos_token_id else "length")
                finished.append(r)
            else:
                anchor[r] += len(st.release(s.buffer_tokens))
        for r in rollbacks:
            states[r].roll_back()
            policy.truncate(r, anchor[r])
            temps[r] = s.retry_temperature
            if intervention and intervened_at[r] != len(states[r].committed):
                policy.append(r, intervention)
                anchor[r] += len(intervention)
                intervened_at[r] = len(states[r].committed)
        if rollbacks:
            watch.open({r: guard_prefix[r] + states[r].committed for r in rollbacks})  # type: ignore[union-attr]
        if finished:
            policy.drop(finished)
            if watch:
                watch.close(r for r in finished if r in watch.where)
        if on_commit is not None:
            for r in active:
                if len(states[r].committed) > sent[r]:
                    on_commit(r, states[r].committed[sent[r]:])
                    sent[r] = len(states[r].committed)
        active = [r for r in active if r not in set(finished)]
    return states


def answer_text(tokenizer: Any, state: ResponseState, settings: CareSettings) -> str:
    """What the user sees: the delivered tokens decoded, then the fallback text if it was used."""
    text = tokenizer.decode(state.committed, skip_special_tokens=True)
    if not state.fallback:
        return text
    return f"{text.rstrip()} {settings.fallback_text}" if text.strip() else settings.fallback_text
