"""From rollouts to scored rollouts: ask the guard about each answer (and thinking), the RM about each answer.

Shared by the training step and evaluation, so both judge samples identically. The guard judges (x, y) for
every rollout and (x, t) for rollouts with thinking, as in the Qwen3-4B-SafeRL recipe; the requests of a call
go out together and are sharded over the guard actors. Each rollout comes back as one `ScoredRollout` holding
its verdicts and helpfulness score, the record the reward recipe, group selection and metrics read.

`generate_and_score` overlaps scoring with generation: on Ray each prompt's group is handed to the scorers as
soon as its samples are finished, while the engines go on with the other groups. Groups that finish while the
scorers are busy are coalesced into their next call, so the scorers see few, large batches (the same idea as
continuous batching) instead of one call per group.

`with_reference_logprobs` adds what the frozen starting policy thinks of each response (the fluency gate's and
the monitor's input), one trainer call over the whole round.
"""

from __future__ import annotations

import dataclasses

from saferl.guard.scorer import ModerationItem
from saferl.handles import GuardGroup, HelpfulnessGroup, RolloutGroup, TrainerGroup
from saferl.tracking import PhaseTimer
from saferl.types import Prompt, Rollout, ScoredRollout, TrainBatch


class Scoring:
    """Guard and RM calls in flight for a list of rollouts (`submit_scoring`)."""

    def __init__(self, rollouts: list[Rollout], guard: GuardGroup, helpfulness: HelpfulnessGroup | None) -> None:
        # One guard call: every answer, then every thinking text, so the guard batches them together.
        items = [ModerationItem(r.prompt.messages, r.answer) for r in rollouts]
        items += [ModerationItem(r.prompt.messages, r.thinking) for r in rollouts if r.thinking]
        self.rollouts, self.n_items = rollouts, len(items)
        self.guard = guard.moderate(items)
        pairs = [(r.prompt.messages, r.answer) for r in rollouts]
        self.rm = helpfulness.score(pairs) if helpfulness is not None else None

    def done(self) -> bool:
        return self.guard.done() and (self.rm is None or self.rm.done())

    def result(self) -> list[ScoredRollout]:
        """One record per rollout, in the order of the rollouts."""
        verdicts = self.guard.result()
        if len(verdicts) != self.n_items:
            raise ValueError(f"the guard returned {len(verdicts)} verdicts for {self.n_items} texts")
        in_order = iter(verdicts)  # the answers' verdicts, then the thinking texts'
        answers = [next(in_order) for _ in self.rollouts]
        thinking = [next(in_order) if r.thinking else None for r in self.rollouts]
        scores: list[tuple[tuple[float, ...], bool]] = (self.rm.result() if self.rm is not None
                                                        else [((), False)] * len(self.rollouts))
        return [ScoredRollout(r, answer, thought, members[0] if members else None, fallback,
                              helpfulness_ensemble=members[1:])
                for r, answer, thought, (members, fallback) in zip(self.rollouts, answers, thinking, scores,
                                                                    strict=True)]


def score_rollouts(rollouts: list[Rollout], guard: GuardGroup, helpfulness: HelpfulnessGroup | None,
                   timer: PhaseTimer | None = None) -> list[ScoredRollout]:
    """Each rollout with its guard verdicts and helpfulness score.

    With a `timer`, the wait is timed as phase `reward`.
    """
    with (timer or PhaseTimer()).phase("reward"):
        return Scoring(rollouts, guard, helpfulness).result()


def generate_and_score(rollout: RolloutGroup, prompts: list[Prompt], n: int, guard: GuardGroup,
                       helpfulness: HelpfulnessGroup | None, *, temperature: float, top_p: float,
                       max_new_tokens: int, seed: int, timer: PhaseTimer | None = None) -> list[ScoredRollout]:
    """`n` scored rollouts per prompt (grouped, in prompt order).

    Phases: `rollout` until the last group is generated (scoring of earlier groups runs meanwhile on Ray),
    then `reward` for the scoring still outstanding. Prompt i is sampled with seed `seed + i`.
    """
    timer = timer or PhaseTimer()
    sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    if rollout.in_process:  # nothing runs in the background in one process: one batch, then score
        with timer.phase("rollout"):
            rollouts = rollout.generate(prompts, n, **sampling)
        return score_rollouts(rollouts, guard, helpfulness, timer)
    calls: list[Scoring] = []
    finished: list[Rollout] = []
    with timer.phase("rollout"):
        for group in rollout.generate_stream(prompts, n, **sampling):
            finished += group
            if not calls or calls[-1].done():  # scorers idle: hand them everything finished so far
                calls.append(Scoring(finished, guard, helpfulness))
                finished = []
    if finished:
        calls.append(Scoring(finished, guard, helpfulness))
    with timer.phase("reward"):
        scored = [record for call in calls for record in call.result()]
    return sorted(scored, key=lambda record: record.rollout.group)  # stable: a group keeps its sample order


def with_reference_logprobs(records: list[ScoredRollout], trainer: TrainerGroup,
                            timer: PhaseTimer | None = None) -> list[ScoredRollout]:
    """The records with `reference_token_logprobs` and their summaries `reference_logprob` and
    `reference_min_logprob` filled in by one `TrainerGroup.reference_logprobs` call over all of them (timed as
    phase `reference`)."""
    with (timer or PhaseTimer()).phase("reference"):
        tokens = trainer.reference_logprobs(TrainBatch.of(records, [0.0] * len(records)))
    out = []
    for r, lps in zip(records, tokens, strict=True):
        mean, low = fluency_summary(lps)
        out.append(dataclasses.replace(r, reference_logprob=mean, reference_min_logprob=low,
                                       reference_token_logprobs=tuple(lps)))
    return out


def fluency_summary(token_logprobs: list[float]) -> tuple[float, float]:
    """(Mean, minimum) of a response's reference token log-probs: the monitor's and the fluency gate's
    statistics; (0.0, 0.0) for an empty response (the log-prob of nothing)."""
    if not token_logprobs:
        return 0.0, 0.0
    return sum(token_logprobs) / len(token_logprobs), min(token_logprobs)
