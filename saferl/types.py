"""Plain data passed between stages: prompts, rollouts, guard verdicts, scored rollouts (one record per rollout
from scoring to the train batch), the safety policy, rewards, train batches.

Everything here is a dataclass of Python scalars and lists so it crosses Ray actor boundaries cheaply and
imports anywhere (no torch, vLLM or Ray).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


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


class GroundTruth(Protocol):
    """An oracle that knows what an answer really is, beside what the guard says (the toy world is one; real
    prompt sets have none). Held-out evaluation reports `truth_*` rates only when one is handed in."""

    def style(self, prompt: Prompt, answer: str) -> str | None:
        """The answer's true style: "helpful", "refusal", "unsafe", "controversial", "safe_completion" or
        "garbled" (none of them); None when the oracle has no truth for this prompt."""
        ...

    def helpfulness(self, prompt: Prompt, answer: str) -> float | None:
        """The answer's true helpfulness on the RM's scale (what a perfect RM would score), for the monitor's
        RM rank agreement; None when the oracle has no truth for this prompt."""
        ...


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
    """A parsed Qwen3Guard-Gen output. `safety` is None when the Safety line could not be parsed.

    `fallback` marks a stand-in verdict made up by a remote guard client when every endpoint failed: no guard
    judged the text, and `SafetyPolicy.is_unsafe` decides how it counts.
    """

    safety: SafetyLabel | None
    categories: tuple[str, ...] = ()
    refusal: bool | None = None
    parse_ok: bool = True
    raw: str = ""
    fallback: bool = False


@dataclass(frozen=True)
class ModerationItem:
    """What a guard judges: the prompt conversation and, for response moderation, the response text."""

    messages: list[dict[str, str]]
    response: str | None = None


UNPARSABLE_CHOICES = ("unsafe", "safe")
ENSEMBLE_CHOICES = ("mean", "min", "mean_minus_std")

# The guard's category strings (exact output text), in Qwen3Guard-Stream index order; `Jailbreak` is judged on
# prompts only. Here rather than in `saferl.guard.templates` so that `SafetyPolicy` can check its caps.
CATEGORIES: tuple[str, ...] = (
    "Violent",
    "Sexual Content or Sexual Acts",
    "Suicide & Self-Harm",
    "Politically Sensitive Topics",
    "PII",
    "Copyright Violation",
    "Non-violent Illegal Acts",
    "Unethical Acts",
    "Jailbreak",
)


@dataclass(frozen=True)
class SafetyPolicy:
    """When a guard verdict counts as unsafe, what an unsafe or refusing rollout may score, and how the reward
    models' scores become the helpfulness H a recipe uses: the one definition used by the reward recipes
    (`rewards.RewardRules` is this class), the held-out evaluation during training, `saferl eval`,
    `saferl chat --eval` (CARE) and the guard evaluation's strict/loose modes.
    The config schema's `reward.rules` section is this dataclass (keys `reward.rules.<attribute>`).

    Attributes:
        unsafe_cap: an unsafe rollout scores at most this (Qwen3-4B-SafeRL: -10).
        refusal_cap: a refusal scores at most this (Qwen3-4B-SafeRL: -5).
        controversial_is_unsafe: strict (True) counts `Controversial` as unsafe (the guard-only definition in
            the report, as eval_gen.py does; unconfirmed for the hybrid reward), loose (False) as safe.
        unparsable: how a verdict whose Safety line did not parse counts, "unsafe" (conservative) or "safe".
        category_caps: per-category caps for unsafe rollouts (exact guard category names), e.g.
            {"Violent": -10, "Copyright Violation": -4}; an unsafe rollout is capped at the lowest cap among the
            categories its verdicts name, and at `unsafe_cap` when none of them is listed.
        ensemble: how the scores of an RM ensemble (helpfulness.model and helpfulness.ensemble) become H:
            their "mean", their "min", or "mean_minus_std" (mean - ensemble_k * population std). Conservative
            choices rank an answer below where one fooled member would put it.
        ensemble_k: the k of mean_minus_std.
        fluency_min_logprob: the fluency gate. An answer with a token whose log-prob under the frozen starting
            policy is below this (`ScoredRollout.reference_min_logprob`) is scored as garbled: H is capped at
            `implausible_cap` instead of trusting the RM. None: off. The minimum, not the mean: one misspelt
            word in a 30-token answer moves the mean by ~0.4 nats and the minimum by ~10 (toy world: every
            perturbation kind 98-100% below -4, clean policy answers 0%; a mean gate at -0.3 let the policy
            drift to 30% garbled, experiments/2026-12-01-reward-hacking).
        implausible_cap: the most an implausible answer's H may be (a min, like the other caps).

    The fallback rule: a fallback verdict (`GuardVerdict.fallback`, the guard could not be reached) counts as
    safe only when both its label (the configured `guard.fallback`) and `unparsable` say safe. A failure is
    no more informative than an unparsable answer, so it must never score better than one, nor better than
    the fallback the user configured.
    """

    unsafe_cap: float = -10.0
    refusal_cap: float = -5.0
    controversial_is_unsafe: bool = True
    unparsable: str = "unsafe"
    category_caps: dict[str, float] = field(default_factory=dict)
    ensemble: str = "mean"
    ensemble_k: float = 1.0
    fluency_min_logprob: float | None = None
    implausible_cap: float = -3.0

    def __post_init__(self) -> None:
        if self.unparsable not in UNPARSABLE_CHOICES:
            raise ValueError(f"reward.rules.unparsable must be one of {UNPARSABLE_CHOICES}, "
                             f"got {self.unparsable!r}")
        if self.ensemble not in ENSEMBLE_CHOICES:
            raise ValueError(f"reward.rules.ensemble must be one of {ENSEMBLE_CHOICES}, got {self.ensemble!r}")
        unknown = sorted(set(self.category_caps) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"reward.rules.category_caps: unknown categories {unknown}; "
                             f"valid: {list(CATEGORIES)}")

    def is_unsafe(self, verdict: GuardVerdict) -> bool:
        """True if the verdict counts as unsafe (see the class docstring for fallback and unparsable ones)."""
        if verdict.fallback:
            return not (verdict.safety is SafetyLabel.SAFE and self.unparsable == "safe")
        if not verdict.parse_ok or verdict.safety is None:
            return self.unparsable == "unsafe"
        return self.label_is_unsafe(verdict.safety)

    def label_is_unsafe(self, label: SafetyLabel) -> bool:
        """The strict/loose mapping of a parsed label (also behind `saferl.guard.decisions.binary_label`)."""
        if label is SafetyLabel.CONTROVERSIAL:
            return self.controversial_is_unsafe
        return label is SafetyLabel.UNSAFE


@dataclass
class RewardInputs:
    """What a reward recipe sees for a batch of N rollouts.

    `thinking_verdicts[i]` is None when rollout i has no thinking text; `helpfulness` is None when the recipe
    runs without a helpfulness model. `helpfulness_fallback[i]` is True when rollout i's score is the remote
    RM client's `fallback_score` (every endpoint failed) rather than a judgement; None means no fallbacks.
    `helpfulness_ensemble[i]` holds the further ensemble members' scores of rollout i (None: no ensemble);
    `reference_logprob[i]` its mean and `reference_min_logprob[i]` its lowest token log-prob under the starting
    policy (None: not computed). Recipes
    read H through `rewards.base.judged_helpfulness`, which applies the ensemble aggregate and fluency gate.
    """

    answer_verdicts: list[GuardVerdict]
    thinking_verdicts: list[GuardVerdict | None]
    helpfulness: list[float] | None
    helpfulness_fallback: list[bool] | None = None
    helpfulness_ensemble: list[tuple[float, ...]] | None = None
    reference_logprob: list[float] | None = None
    reference_min_logprob: list[float] | None = None

    @classmethod
    def of(cls, records: Sequence[ScoredRollout]) -> RewardInputs:
        """The recipe's view of a batch of records: the one place records become per-field lists."""
        rated = {r.helpfulness is not None for r in records}
        if len(rated) > 1:
            raise ValueError("some rollouts have a helpfulness score and others none; score all or none")
        has_rm = rated == {True}
        members = {len(r.helpfulness_ensemble) for r in records}
        if len(members) > 1:
            raise ValueError(f"rollouts have different numbers of ensemble scores ({sorted(members)})")
        fluency = {r.reference_logprob is not None for r in records}
        if len(fluency) > 1:
            raise ValueError("some rollouts have a reference log-prob and others none; compute all or none")
        return cls(answer_verdicts=[r.answer_verdict for r in records],
                   thinking_verdicts=[r.thinking_verdict for r in records],
                   helpfulness=[r.helpfulness for r in records] if has_rm else None,  # type: ignore[misc]
                   helpfulness_fallback=[r.helpfulness_fallback for r in records] if has_rm else None,
                   helpfulness_ensemble=[r.helpfulness_ensemble for r in records] if members - {0} else None,
                   reference_logprob=([r.reference_logprob for r in records]  # type: ignore[misc]
                                      if fluency == {True} else None),
                   reference_min_logprob=([r.reference_min_logprob for r in records]  # type: ignore[misc]
                                          if fluency == {True} else None))


@dataclass(frozen=True)
class ScoredRollout:
    """One rollout and everything judged about it, the unit that scoring hands to the reward recipe, group
    selection, the step metrics, the train batch and evaluation (a group is a list of these).

    Attributes:
        answer_verdict: the guard on (prompt, answer).
        thinking_verdict: the guard on (prompt, thinking); None when the rollout has no thinking text.
        helpfulness: the RM's (helpfulness.model's) score of the answer; None when the run has no
            helpfulness model.
        helpfulness_ensemble: the scores of the further ensemble members (helpfulness.ensemble, in that
            order) of the same answer; empty without an ensemble.
        helpfulness_fallback: the score is the remote RM client's `fallback_score` (every endpoint failed),
            not a judgement.
        reward: the recipe's reward; None until `rewards.apply_recipe` fills it in.
        reference_logprob: the mean log-prob of the response tokens under the frozen starting policy at
            temperature 1 (`PolicyTrainer.reference_logprobs`), a fluency measure; None unless the run's
            fluency gate or monitor asked for it.
        reference_min_logprob: the lowest of those token log-probs (the fluency gate's statistic); None with
            reference_logprob.
        reference_token_logprobs: those token log-probs themselves, one per response token (the trainer's
            unlikelihood term reads which tokens are implausible); None with reference_logprob.
    """

    rollout: Rollout
    answer_verdict: GuardVerdict
    thinking_verdict: GuardVerdict | None = None
    helpfulness: float | None = None
    helpfulness_fallback: bool = False
    reward: float | None = None
    reference_logprob: float | None = None
    helpfulness_ensemble: tuple[float, ...] = ()
    reference_min_logprob: float | None = None
    reference_token_logprobs: tuple[float, ...] | None = None


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
    recomputes pi_old itself). `reference_logprobs[i]`, when the records carry them, are response i's
    token log-probs under the frozen starting policy (`ScoredRollout.reference_token_logprobs`), for the
    unlikelihood term; None otherwise.
    """

    input_ids: list[list[int]]
    prompt_lens: list[int]
    old_logprobs: list[list[float]]
    advantages: list[float]
    reference_logprobs: list[list[float]] | None = None

    @classmethod
    def of(cls, records: Sequence[ScoredRollout], advantages: list[float]) -> TrainBatch:
        """The sequences of `records` (prompt + response tokens) with one advantage each, and their reference
        token log-probs when every record has them."""
        rollouts = [s.rollout for s in records]
        reference = [s.reference_token_logprobs for s in records]
        for s, lps in zip(records, reference):
            if lps is not None and len(lps) != len(s.rollout.response_ids):
                raise ValueError(f"a record has {len(lps)} reference token log-probs for "
                                 f"{len(s.rollout.response_ids)} response tokens")
        return cls(input_ids=[r.prompt_ids + r.response_ids for r in rollouts],
                   prompt_lens=[len(r.prompt_ids) for r in rollouts],
                   old_logprobs=[r.logprobs for r in rollouts], advantages=advantages,
                   reference_logprobs=([list(lps) for lps in reference]  # type: ignore[arg-type]
                                       if records and all(lps is not None for lps in reference) else None))


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
