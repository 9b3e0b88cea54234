"""The reward-recipe contract, the rules mapping guard verdicts to signals, and the metrics all recipes log.

A recipe is any function `(RewardInputs, RewardRules) -> RewardOutput`; the built-ins live in their own
modules and custom ones are found by dotted path (see `rewards.load_recipe`). Per-rollout signals and batch
metrics are computed here once so every recipe reports the same components and metrics.
"""

from __future__ import annotations

import dataclasses
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
    n = len(inputs.answer_verdicts)
    if len(inputs.thinking_verdicts) != n:
        raise ValueError(f"{n} answer verdicts but {len(inputs.thinking_verdicts)} thinking verdicts")
    if inputs.helpfulness is not None and len(inputs.helpfulness) != n:
        raise ValueError(f"{n} answer verdicts but {len(inputs.helpfulness)} helpfulness scores")
    if inputs.helpfulness_fallback is not None and len(inputs.helpfulness_fallback) != n:
        raise ValueError(f"{n} answer verdicts but {len(inputs.helpfulness_fallback)} helpfulness_fallback flags")
    return [
        is_unsafe(answer, rules) or (thinking is not None and is_unsafe(thinking, rules))
        for answer, thinking in zip(inputs.answer_verdicts, inputs.thinking_verdicts, strict=True)
    ]


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


def require_helpfulness(inputs: RewardInputs, recipe: str) -> list[float]:
    """The helpfulness scores, or a ValueError naming the recipe that needs them."""
    if inputs.helpfulness is None:
        raise ValueError(
            f"reward recipe {recipe!r} needs helpfulness scores, but RewardInputs.helpfulness is None"
        )
    return inputs.helpfulness


def finish(inputs: RewardInputs, rules: RewardRules, total: list[float], unsafe: list[bool]) -> RewardOutput:
    """Wrap totals into a RewardOutput with the shared per-rollout components and batch metrics.

    Components (length N): unsafe, refusal, controversial (0/1), helpfulness when given. Metrics: unsafe_rate,
    controversial_rate (any verdict of the rollout Controversial), refusal_rate, parse_failures and
    guard_fallbacks (counts over answer and thinking verdicts), reward_mean; helpfulness_mean and
    helpfulness_fallbacks (rollouts scored with the RM's fallback) when helpfulness is given.
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
    return RewardOutput(total=total, components=components, metrics=metrics)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
