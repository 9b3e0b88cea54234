"""Plain data passed between stages: prompts, rollouts, guard verdicts, rewards, train batches.

Everything here is a dataclass of Python scalars and lists so it crosses Ray actor boundaries cheaply and
imports anywhere (no torch, vLLM or Ray).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SafetyLabel(str, enum.Enum):
    """The three labels of the Qwen3Guard `Safety:` line (exact strings)."""

    SAFE = "Safe"
    UNSAFE = "Unsafe"
    CONTROVERSIAL = "Controversial"


@dataclass(frozen=True)
class Prompt:
    """One chat prompt. `messages` ends with a user turn; `kind` is benign | harmful | controversial | unknown."""

    id: str
    messages: list[dict[str, str]]
    kind: str = "unknown"
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user message."""
        return self.messages[-1]["content"]


@dataclass
class Rollout:
    """One sampled response. `logprobs[i]` is the behaviour log-prob of `response_ids[i]` (tempered)."""

    prompt: Prompt
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    thinking: str
    answer: str
    finish_reason: str
    group: int = 0


@dataclass(frozen=True)
class GuardVerdict:
    """A parsed Qwen3Guard-Gen output. `safety` is None when the Safety line could not be parsed."""

    safety: SafetyLabel | None
    categories: tuple[str, ...] = ()
    refusal: bool | None = None
    parse_ok: bool = True
    raw: str = ""


@dataclass
class RewardInputs:
    """What a reward recipe sees for a batch of N rollouts.

    `thinking_verdicts[i]` is None when rollout i has no thinking text; `helpfulness` is None when the recipe
    runs without a helpfulness model.
    """

    answer_verdicts: list[GuardVerdict]
    thinking_verdicts: list[GuardVerdict | None]
    helpfulness: list[float] | None


@dataclass
class RewardOutput:
    """Scalar reward per rollout, its named components (each length N), and batch-level metrics."""

    total: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainBatch:
    """Sequences for one policy update. All lists have one entry per rollout.

    `input_ids[i]` = prompt + response tokens; the response starts at `prompt_lens[i]`.
    `old_logprobs` are the behaviour log-probs from the rollout engine (used for diagnostics; the trainer
    recomputes pi_old itself).
    """

    input_ids: list[list[int]]
    prompt_lens: list[int]
    old_logprobs: list[list[float]]
    advantages: list[float]


@dataclass(frozen=True)
class StreamVerdict:
    """A Qwen3Guard-Stream reading at one token of a conversation.

    `role` is "user" for the query heads read at the `<|im_end|>` closing the user turn, "assistant" for the
    response heads read at every later token. `risk` is the winning risk label's exact string from the
    checkpoint's label map (Safe / Unsafe / Controversial) and `risk_prob` its softmax probability (not P(unsafe));
    `category` is the winning category, meaningful only when `risk` is not Safe.
    """

    position: int
    role: str
    risk: str
    risk_prob: float
    category: str
    category_prob: float
