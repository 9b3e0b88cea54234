"""From rollouts to reward inputs: ask the guard about each answer (and thinking), the RM about each answer.

Shared by the training step and evaluation, so both judge samples identically. The guard judges (x, y) for
every rollout and (x, t) for rollouts with thinking, as in the Qwen3-4B-SafeRL recipe; the requests of a call
go out together and are sharded over the guard actors.

`generate_and_score` overlaps scoring with generation: on Ray each prompt's group is handed to the scorers as
soon as its samples are finished, while the engines go on with the other groups. Groups that finish while the
scorers are busy are coalesced into their next call, so the scorers see few, large batches (the same idea as
continuous batching) instead of one call per group.
"""

from __future__ import annotations

from typing import Any

from saferl.guard.scorer import ModerationItem
from saferl.tracking import PhaseTimer
from saferl.types import GuardVerdict, RewardInputs, Rollout


class Scoring:
    """Guard and RM calls in flight for a list of rollouts (`submit_scoring`)."""

    def __init__(self, rollouts: list[Rollout], guard: Any, helpfulness: Any | None) -> None:
        items = [ModerationItem(r.prompt.messages, r.answer) for r in rollouts]
        self.thinking_at = [i for i, r in enumerate(rollouts) if r.thinking]
        items += [ModerationItem(rollouts[i].prompt.messages, rollouts[i].thinking) for i in self.thinking_at]
        self.rollouts = rollouts
        self.guard = guard.submit("moderate", items)
        pairs = [(r.prompt.messages, r.answer) for r in rollouts]
        self.rm = helpfulness.submit("score_with_fallbacks", pairs) if helpfulness is not None else None

    def done(self) -> bool:
        return self.guard.done() and (self.rm is None or self.rm.done())

    def result(self) -> RewardInputs:
        verdicts: list[GuardVerdict] = self.guard.result()
        n = len(self.rollouts)
        thinking: list[GuardVerdict | None] = [None] * n
        for i, v in zip(self.thinking_at, verdicts[n:]):
            thinking[i] = v
        if self.rm is None:
            return RewardInputs(answer_verdicts=verdicts[:n], thinking_verdicts=thinking, helpfulness=None)
        scores: list[tuple[float, bool]] = self.rm.result()
        return RewardInputs(answer_verdicts=verdicts[:n], thinking_verdicts=thinking,
                            helpfulness=[s for s, _ in scores], helpfulness_fallback=[f for _, f in scores])


def reward_inputs(rollouts: list[Rollout], guard: Any, helpfulness: Any | None,
                  timer: PhaseTimer | None = None) -> RewardInputs:
    """Guard verdicts and helpfulness scores for a batch (`guard`/`helpfulness` are ActorGroups).

    With a `timer`, the wait is timed as phase `reward`.
    """
    with (timer or PhaseTimer()).phase("reward"):
        return Scoring(rollouts, guard, helpfulness).result()


def generate_and_score(rollout: Any, prompts: list[Any], n: int, guard: Any, helpfulness: Any | None, *,
                       timer: PhaseTimer | None = None, **sampling: Any) -> tuple[list[Rollout], RewardInputs]:
    """`n` rollouts per prompt (grouped, in prompt order) and their reward inputs.

    Phases: `rollout` until the last group is generated (scoring of earlier groups runs meanwhile on Ray),
    then `reward` for the scoring still outstanding. `sampling`: `RolloutWorker.generate_stream` keywords.
    """
    timer = timer or PhaseTimer()
    if rollout.executor == "local":  # nothing runs in the background in one process: one batch, then score
        with timer.phase("rollout"):
            rollouts = rollout.map("generate", prompts, n, offset_kwarg="first_group", **sampling)
        return rollouts, reward_inputs(rollouts, guard, helpfulness, timer)
    calls: list[Scoring] = []
    finished: list[Rollout] = []
    with timer.phase("rollout"):
        for group in rollout.stream("generate_stream", prompts, n, offset_kwarg="first_group", **sampling):
            finished += group
            if not calls or calls[-1].done():  # scorers idle: hand them everything finished so far
                calls.append(Scoring(finished, guard, helpfulness))
                finished = []
    if finished:
        calls.append(Scoring(finished, guard, helpfulness))
    with timer.phase("reward"):
        parts = [(call.rollouts, call.result()) for call in calls]
    return _in_group_order(parts)


def _in_group_order(parts: list[tuple[list[Rollout], RewardInputs]]) -> tuple[list[Rollout], RewardInputs]:
    """Concatenate per-call results and sort rollouts (with their verdicts and scores) by group."""
    rows = [(r, inputs.answer_verdicts[i], inputs.thinking_verdicts[i],
             inputs.helpfulness[i] if inputs.helpfulness is not None else None,
             inputs.helpfulness_fallback is not None and inputs.helpfulness_fallback[i])
            for rollouts, inputs in parts for i, r in enumerate(rollouts)]
    rows.sort(key=lambda row: row[0].group)  # stable: samples keep their order within a group
    has_rm = bool(parts) and parts[0][1].helpfulness is not None
    return [row[0] for row in rows], RewardInputs(
        answer_verdicts=[row[1] for row in rows], thinking_verdicts=[row[2] for row in rows],
        helpfulness=[row[3] for row in rows] if has_rm else None,
        helpfulness_fallback=[row[4] for row in rows] if has_rm else None)
