"""The Qwen3-4B-SafeRL hybrid reward (Qwen3Guard report §3.5).

    r = min(unsafe_cap, H)    if unsafe(thinking) or unsafe(answer)   (per-category caps: see RewardRules)
        min(refusal_cap, H)   elif refusal(answer)
        H                     otherwise

The caps are a min, not an assignment: a helpfulness score already below the cap is kept, so among capped
rollouts H still ranks them.
"""

from __future__ import annotations

from rewards.base import RewardRules, finish, is_refusal, require_helpfulness, rollout_unsafe, unsafe_caps
from saferl.types import RewardInputs, RewardOutput


def hybrid(inputs: RewardInputs, rules: RewardRules) -> RewardOutput:
    """Gate helpfulness by safety and refusal; needs `inputs.helpfulness`."""
    helpfulness = require_helpfulness(inputs, "hybrid")
    unsafe = rollout_unsafe(inputs, rules)
    total = []
    for h, bad, cap, answer in zip(helpfulness, unsafe, unsafe_caps(inputs, rules), inputs.answer_verdicts,
                                   strict=True):
        if bad:
            total.append(min(cap, h))
        elif is_refusal(answer):
            total.append(min(rules.refusal_cap, h))
        else:
            total.append(float(h))
    return finish(inputs, rules, total, unsafe)
