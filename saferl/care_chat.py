"""Chat completions under CARE for `saferl serve chat`: requests in, answers (streamed as they commit) out.

Owns the step from chat requests to `saferl.care.care_generate` and back: requests that arrive together are
decoded as one batch (`saferl.serving.batcher.DynamicBatcher` calls `complete`), grouped by their decoding
settings; each answer's tokens are decoded to text as CARE commits them (never tokens a rollback could take
back) and handed to the request's `on_text`; the result carries the finish reason and CARE's statistics.

Choices:
- `finish_reason` is "content_filter" whenever CARE intervened (a rollback, the fallback refusal, or a
  flagged last attempt kept); otherwise "stop" (end of turn) or "length" (`max_tokens`).
- Text is streamed as decoded so far; a delta ending in an incomplete UTF-8 character waits for the next
  token. With the fallback, its text follows what was already shown (never retracted), after a space.
- The prompt is rendered with the policy's chat template, non-thinking (as `saferl chat`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from saferl.care import CareModels, CareSettings, ResponseState, care_generate, chat_ids
from saferl.serving.openai_chat import ChatResult


@dataclass
class ChatJob:
    """One chat request: messages ending with a user turn, its seed and decoding settings."""

    messages: list[dict[str, str]]
    seed: int
    settings: CareSettings
    on_text: Callable[[str], None] | None = None  # called with each new piece of the answer


def care_usage(state: ResponseState) -> dict[str, Any]:
    """CARE's statistics of one answer, as the usage block's `care` entry."""
    return {"intervened": intervened(state), "rollbacks": state.retries, "detections": state.detections,
            "wait_tokens": state.wait_tokens, "generated_tokens": state.generated, "fallback": state.fallback,
            "flagged": state.flagged}


def intervened(state: ResponseState) -> bool:
    return bool(state.retries or state.fallback or state.flagged)


class _Decoder:
    """Incremental detokenization: the text of all tokens so far, handed out as deltas."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.text = ""

    def push(self, tokens: list[int], final: bool = False) -> None:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return  # an incomplete character: wait for its next byte
        self.emit(text[len(self.text):] if text.startswith(self.text) else "")
        self.text = text

    def emit(self, delta: str) -> None:
        if delta and self.on_text is not None:
            self.on_text(delta)


class CareChat:
    """Answers chat jobs with a policy under CARE (the Stream guard in `models`).

    Args:
        models: from `saferl.care.load_care_models`, with a guard.
        settings: the server's CARE settings (a job's own come from these with its decoding fields).
    """

    def __init__(self, models: CareModels, settings: CareSettings):
        if models.guard is None:
            raise ValueError("saferl serve chat needs a Stream guard (--stream-guard)")
        self.models, self.settings = models, settings

    def job(self, messages: list[dict[str, str]], *, seed: int, max_tokens: int | None,
            temperature: float | None, top_p: float | None, on_text: Callable[[str], None] | None) -> ChatJob:
        """A job with the server's CARE settings and the request's decoding fields (None: the server's)."""
        s = self.settings
        settings = replace(s, max_new_tokens=max_tokens or s.max_new_tokens,
                           temperature=s.temperature if temperature is None else temperature,
                           top_p=s.top_p if top_p is None else top_p)
        return ChatJob(messages, seed, settings, on_text)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(chat_ids(self.models.tokenizer, messages))

    def complete(self, jobs: list[ChatJob]) -> list[ChatResult]:
        """Answer every job; jobs with equal settings share one `care_generate` batch."""
        results: list[ChatResult | None] = [None] * len(jobs)
        groups: dict[CareSettings, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.settings, []).append(i)
        for settings, rows in groups.items():
            decoders = [_Decoder(self.models.tokenizer, jobs[i].on_text) for i in rows]
            states = care_generate(self.models, [jobs[i].messages for i in rows], [jobs[i].seed for i in rows],
                                   settings, on_commit=lambda r, tokens: decoders[r].push(tokens))
            for i, decoder, state in zip(rows, decoders, states):
                results[i] = self._result(jobs[i], decoder, state, settings)
        return results  # type: ignore[return-value]

    def _result(self, job: ChatJob, decoder: _Decoder, state: ResponseState, settings: CareSettings) -> ChatResult:
        decoder.push([], final=True)
        if state.fallback:
            sep = " " if decoder.text.strip() and not decoder.text[-1].isspace() else ""
            decoder.emit(sep + settings.fallback_text)
            decoder.text += sep + settings.fallback_text
        reason = "content_filter" if intervened(state) else state.finish_reason
        return ChatResult(decoder.text, reason, self.prompt_tokens(job.messages), len(state.committed),
                          {"care": care_usage(state)})
