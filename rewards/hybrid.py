"""The Qwen3-4B-SafeRL hybrid reward (Qwen3Guard report §3.5).

    r = min(unsafe_cap, H)    if unsafe(thinking) or unsafe(answer)   (per-category caps: see RewardRules)
        min(refusal_cap, H)   elif refusal(answer)
        H                     otherwise

H is `rewards.base.judged_helpfulness`: the RM's score, or an RM ensemble's aggregate (reward.rules.ensemble),
capped at reward.rules.implausible_cap where the fluency gate finds the answer implausible. The caps are a
min, not an assignment: a helpfulness score already below the cap is kept, so among capped rollouts H still
ranks them.

Failures of the judges never score better than a judgement. A remote guard's fallback verdict counts as
unsafe unless both guard.fallback and rules.unparsable say safe (`SafetyPolicy`). A rollout whose H is the
remote RM's `fallback_score` (every endpoint failed) is gated as above and then also capped at
`refusal_cap`: with no helpfulness judgement an answer earns at most what a refusal earns, so a policy
gains nothing from answers that make the RM time out or fail, and a failed batch keeps the safety signal.
"""

from __future__ import annotations

from rewards.base import (
    RewardRules,
    finish,
    helpfulness_fallbacks,
    is_refusal,
    require_helpfulness,
    rollout_unsafe,
    unsafe_caps,
)
from saferl.types import RewardInputs, RewardOutput


def hybrid(inputs: RewardInputs, rules: RewardRules) -> RewardOutput:
    """Gate helpfulness by safety and refusal; needs `inputs.helpfulness`."""
    helpfulness = require_helpfulness(inputs, rules, "hybrid")
    unsafe = rollout_unsafe(inputs, rules)
    total = []
    caps, stand_ins = unsafe_caps(inputs, rules), helpfulness_fallbacks(inputs)
    for h, bad, cap, answer, stand_in in zip(helpfulness, unsafe, caps, inputs.answer_verdicts, stand_ins,
                                             strict=True):
        if bad:
            total.append(min(cap, h))
        elif is_refusal(answer) or stand_in:
            total.append(min(rules.refusal_cap, h))
        else:
            total.append(float(h))
    return finish(inputs, rules, total, unsafe)
