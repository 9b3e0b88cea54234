"""From rollouts to reward inputs: ask the guard about each answer (and thinking), the RM about each answer.

Shared by the training step and evaluation, so both judge samples identically. The guard judges (x, y) for
every rollout and (x, t) for rollouts with thinking, as in the Qwen3-4B-SafeRL recipe; all requests of a
batch go out together and are sharded over the guard actors.
"""

from __future__ import annotations

from typing import Any

from saferl.guard.scorer import ModerationItem
from saferl.tracking import PhaseTimer
from saferl.types import GuardVerdict, RewardInputs, Rollout


def reward_inputs(rollouts: list[Rollout], guard: Any, helpfulness: Any | None,
                  timer: PhaseTimer | None = None) -> RewardInputs:
    """Guard verdicts and helpfulness scores for a batch (`guard`/`helpfulness` are ActorGroups).

    With a `timer`, the guard and RM calls are timed as phases `guard` and `rm`.
    """
    timer = timer or PhaseTimer()
    items = [ModerationItem(r.prompt.messages, r.answer) for r in rollouts]
    thinking_at = [i for i, r in enumerate(rollouts) if r.thinking]
    items += [ModerationItem(rollouts[i].prompt.messages, rollouts[i].thinking) for i in thinking_at]
    with timer.phase("guard"):
        verdicts: list[GuardVerdict] = guard.map("moderate", items)
    answer_verdicts = verdicts[: len(rollouts)]
    thinking: list[GuardVerdict | None] = [None] * len(rollouts)
    for i, v in zip(thinking_at, verdicts[len(rollouts) :]):
        thinking[i] = v
    scores = None
    if helpfulness is not None:
        with timer.phase("rm"):
            scores = helpfulness.map("score", [(r.prompt.messages, r.answer) for r in rollouts])
    return RewardInputs(answer_verdicts=answer_verdicts, thinking_verdicts=thinking, helpfulness=scores)
