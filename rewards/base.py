"""The reward-recipe contract, the rules mapping guard verdicts to signals, and the metrics all recipes log.

A recipe is any function `(RewardInputs, RewardRules) -> RewardOutput`; the built-ins live in their own
modules and custom ones are found by dotted path (see `rewards.load_recipe`). Per-rollout signals and batch
metrics are computed here once so every recipe reports the same components and metrics, and so is the
helpfulness H every recipe uses (`judged_helpfulness`: the RM ensemble's aggregate, then the fluency gate).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

from saferl.types import GuardVerdict, RewardInputs, RewardOutput, SafetyLabel, SafetyPolicy, ScoredRollout


# The rules a recipe applies are the run's SafetyPolicy (config reward.rules): one class, this name kept for
# the recipe signature custom recipes are written against.
RewardRules = SafetyPolicy


class RewardRecipe(Protocol):
    """Turns the guard verdicts (and helpfulness scores) of N rollouts into N rewards."""

    def __call__(self, inputs: RewardInputs, rules: RewardRules) -> RewardOutput: ...


def apply_recipe(recipe: RewardRecipe, records: list[ScoredRollout], rules: RewardRules) -> list[ScoredRollout]:
    """The records with `reward` filled in by one call of `recipe` on the whole batch (a recipe may use batch
    statistics, so it is never called group by group)."""
    out = recipe(RewardInputs.of(records), rules)
    if len(out.total) != len(records):
        raise ValueError(f"the reward recipe returned {len(out.total)} rewards for {len(records)} rollouts")
    return [dataclasses.replace(r, reward=float(total)) for r, total in zip(records, out.total, strict=True)]


def is_unsafe(verdict: GuardVerdict, rules: RewardRules) -> bool:
    """True if the verdict counts as unsafe under `rules` (`SafetyPolicy.is_unsafe`: Controversial, unparsable
    and fallback verdicts)."""
    return rules.is_unsafe(verdict)


def is_refusal(verdict: GuardVerdict) -> bool:
    """True only on the guard's explicit `Refusal: Yes`; unknown (None) is not a refusal."""
    return verdict.refusal is True


def rollout_unsafe(inputs: RewardInputs, rules: RewardRules) -> list[bool]:
    """Per rollout: the answer, or the thinking when there is one, counts as unsafe. Checks list lengths."""
    check_lengths(inputs)
    return [
        is_unsafe(answer, rules) or (thinking is not None and is_unsafe(thinking, rules))
        for answer, thinking in zip(inputs.answer_verdicts, inputs.thinking_verdicts, strict=True)
    ]


def check_lengths(inputs: RewardInputs) -> None:
    """ValueError naming the field when a per-rollout list of `inputs` is not one entry per answer verdict."""
    n = len(inputs.answer_verdicts)
    fields = {"thinking verdicts": inputs.thinking_verdicts, "helpfulness scores": inputs.helpfulness,
              "helpfulness_fallback flags": inputs.helpfulness_fallback,
              "helpfulness_ensemble entries": inputs.helpfulness_ensemble,
              "reference log-probs": inputs.reference_logprob,
              "reference minimum log-probs": inputs.reference_min_logprob}
    for name, values in fields.items():
        if values is not None and len(values) != n:
            raise ValueError(f"{n} answer verdicts but {len(values)} {name}")


def unsafe_caps(inputs: RewardInputs, rules: RewardRules) -> list[float]:
    """Per rollout, the cap an unsafe verdict imposes: the lowest `category_caps` entry among the categories
    of its answer and thinking verdicts, else `unsafe_cap`."""
    caps = []
    for pair in zip(inputs.answer_verdicts, inputs.thinking_verdicts, strict=True):
        named = {c for v in pair if v is not None for c in v.categories}
        caps.append(min([rules.unsafe_cap] * (not named & rules.category_caps.keys())
                        + [rules.category_caps[c] for c in named & rules.category_caps.keys()]))
    return caps


def helpfulness_fallbacks(inputs: RewardInputs) -> list[bool]:
    """Per rollout: its helpfulness score is the remote RM's fallback, not a judgement."""
    if inputs.helpfulness_fallback is None:
        return [False] * len(inputs.answer_verdicts)
    return list(inputs.helpfulness_fallback)


def require_helpfulness(inputs: RewardInputs, rules: RewardRules, recipe: str) -> list[float]:
    """The helpfulness H per rollout (`judged_helpfulness`), or a ValueError naming the recipe that needs it."""
    if inputs.helpfulness is None:
        raise ValueError(
            f"reward recipe {recipe!r} needs helpfulness scores, but RewardInputs.helpfulness is None"
        )
    return judged_helpfulness(inputs, rules)


def ensemble_score(scores: Sequence[float], how: str, k: float) -> float:
    """One score from an ensemble's: their mean, their min, or mean_minus_std (mean - k * population std)."""
    mean = sum(scores) / len(scores)
    if how == "mean":
        return mean
    if how == "min":
        return min(scores)
    if how == "mean_minus_std":
        return mean - k * _std(scores)
    raise ValueError(f"unknown ensemble aggregate {how!r}")


def _std(scores: Sequence[float]) -> float:
    mean = sum(scores) / len(scores)
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


def member_scores(inputs: RewardInputs) -> list[tuple[float, ...]]:
    """Per rollout, every RM member's score: helpfulness.model's first, then the ensemble's."""
    if inputs.helpfulness is None:
        raise ValueError("RewardInputs.helpfulness is None: there are no RM scores to judge by")
    if inputs.helpfulness_ensemble is None:
        return [(h,) for h in inputs.helpfulness]
    return [(h, *more) for h, more in zip(inputs.helpfulness, inputs.helpfulness_ensemble, strict=True)]


def implausible(inputs: RewardInputs, rules: RewardRules) -> list[bool]:
    """Per rollout: the fluency gate finds the answer implausible (a token whose reference log-prob is below
    `rules.fluency_min_logprob`); all False with the gate off. A gate that is on never passes an answer it
    cannot judge: without reference log-probs it raises."""
    n = len(inputs.answer_verdicts)
    if rules.fluency_min_logprob is None:
        return [False] * n
    if inputs.reference_min_logprob is None:
        raise ValueError("reward.rules.fluency_min_logprob is set but the rollouts carry no reference "
                         "log-probs (ScoredRollout.reference_min_logprob); the driver must fill them in "
                         "(saferl.scoring.with_reference_logprobs)")
    return [lp < rules.fluency_min_logprob for lp in inputs.reference_min_logprob]


def judged_helpfulness(inputs: RewardInputs, rules: RewardRules) -> list[float]:
    """The H every recipe uses, per rollout: the RM members' scores aggregated by `rules.ensemble` (the one
    score without an ensemble), then, where the fluency gate finds the answer implausible,
    min(H, rules.implausible_cap): a garbled answer is not trusted to the RM."""
    check_lengths(inputs)
    gated = implausible(inputs, rules)
    judged = [ensemble_score(scores, rules.ensemble, rules.ensemble_k) for scores in member_scores(inputs)]
    return [min(h, rules.implausible_cap) if bad else h for h, bad in zip(judged, gated, strict=True)]


def finish(inputs: RewardInputs, rules: RewardRules, total: list[float], unsafe: list[bool]) -> RewardOutput:
    """Wrap totals into a RewardOutput with the shared per-rollout components and batch metrics.

    Components (length N): unsafe, refusal, controversial (0/1), helpfulness (helpfulness.model's score, before
    the ensemble and the gate) when given. Metrics: unsafe_rate, controversial_rate (any verdict of the
    rollout Controversial), refusal_rate, parse_failures and guard_fallbacks (counts over answer and thinking
    verdicts), reward_mean; helpfulness_mean and helpfulness_fallbacks (rollouts scored with the RM's
    fallback) when helpfulness is given; ensemble_spread (the mean over rollouts of the members' population
    std) with an ensemble; implausible_rate (rollouts the fluency gate capped) with the gate on.
    """
    verdicts = list(zip(inputs.answer_verdicts, inputs.thinking_verdicts, strict=True))
    refusal = [float(is_refusal(a)) for a, _ in verdicts]
    controversial = [
        float(any(v is not None and v.safety is SafetyLabel.CONTROVERSIAL for v in pair)) for pair in verdicts
    ]
    failures = sum(1 for pair in verdicts for v in pair if v is not None and not v.parse_ok)
    fallbacks = sum(1 for pair in verdicts for v in pair if v is not None and v.fallback)
    components = {"unsafe": [float(u) for u in unsafe], "refusal": refusal, "controversial": controversial}
    metrics = {
        "unsafe_rate": _mean(components["unsafe"]),
        "controversial_rate": _mean(controversial),
        "refusal_rate": _mean(refusal),
        "parse_failures": float(failures),
        "guard_fallbacks": float(fallbacks),
        "reward_mean": _mean(total),
    }
    if inputs.helpfulness is not None:
        components["helpfulness"] = [float(h) for h in inputs.helpfulness]
        metrics["helpfulness_mean"] = _mean(components["helpfulness"])
        metrics["helpfulness_fallbacks"] = float(sum(helpfulness_fallbacks(inputs)))
    if inputs.helpfulness_ensemble is not None:
        metrics["ensemble_spread"] = _mean([_std(scores) for scores in member_scores(inputs)])
    if rules.fluency_min_logprob is not None:
        metrics["implausible_rate"] = _mean([float(bad) for bad in implausible(inputs, rules)])
    return RewardOutput(total=total, components=components, metrics=metrics)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
