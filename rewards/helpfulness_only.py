"""Helpfulness-only reward: r = H (`rewards.base.judged_helpfulness`). The ablation with no safety term;
verdicts are still logged."""

from __future__ import annotations

from rewards.base import RewardRules, finish, require_helpfulness, rollout_unsafe
from saferl.types import RewardInputs, RewardOutput


def helpfulness_only(inputs: RewardInputs, rules: RewardRules) -> RewardOutput:
    """The helpfulness score itself; needs `inputs.helpfulness`."""
    helpfulness = require_helpfulness(inputs, rules, "helpfulness_only")
    return finish(inputs, rules, [float(h) for h in helpfulness], rollout_unsafe(inputs, rules))
