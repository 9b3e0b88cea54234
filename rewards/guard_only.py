"""The Qwen3Guard report's guard-only reward: 1.0 when the answer and the thinking (if any) are safe, else 0.

"Safe" is `not is_unsafe` under the rules, so Controversial and unparsable verdicts follow `RewardRules`. The
report notes this reward collapses into refusing almost everything; it is kept as the baseline.
"""

from __future__ import annotations

from rewards.base import RewardRules, finish, rollout_unsafe
from saferl.types import RewardInputs, RewardOutput


def guard_only(inputs: RewardInputs, rules: RewardRules) -> RewardOutput:
    """1.0 per safe rollout, 0.0 per unsafe one; helpfulness, if given, is only logged."""
    unsafe = rollout_unsafe(inputs, rules)
    return finish(inputs, rules, [0.0 if bad else 1.0 for bad in unsafe], unsafe)
