"""The early warning of reward hacking: each step, a sample of the trained rollouts is judged again.

A policy that learns to please its reward guard and RM rather than to be safe and helpful shows it first as
the reward's judges drifting away from an independent view of the same answers, well before held-out rates
or KL curves move. `Monitor.observe` takes `sample` rollouts of the trained batch (whole prompt groups, drawn
with the monitor's own seeded generator) and logs:

  monitor/judge_disagreement  with an independent judge (`eval.judge`): the fraction of sampled rollouts whose
                              decision, unsafe under the run's `SafetyPolicy` or refused, differs between the
                              reward guard and the judge
  monitor/rm_rank_agreement   with a ground-truth oracle that knows helpfulness (the toy world): over pairs
                              of sampled rollouts of one prompt whose true helpfulness differs, the fraction
                              the RM strictly orders the same way (a tie is no agreement); NaN without a pair
  monitor/ref_logprob         mean over the sample of each answer's mean token log-prob under the frozen
                              starting policy (`ScoredRollout.reference_logprob`; computed here when the
                              reward did not need it): garbled text is improbable under the SFT policy
  monitor/ref_logprob_drop    the first monitored step's ref_logprob minus this step's (the baseline is kept
                              in the checkpoint state, so a resumed run measures from the same start)
  monitor/implausible_rate    over the whole trained batch: the fraction of answers with a token whose
                              log-prob under the starting policy is below `monitor.implausible_logprob`
                              (`ScoredRollout.reference_min_logprob`, the fluency gate's statistic)
  monitor/implausible_advantage  over the whole batch: the mean advantage the update gives those implausible
                              answers; NaN when there is none. Positive: the reward prefers text the starting
                              policy finds implausible to the other answers of the same prompt, so the update
                              reinforces it. This measures the incentive to garble, not the garbling: it is
                              high before the garbled rate rises, and low when a fluency gate caps them
  monitor/probe_implausible_rate, monitor/probe_implausible_advantage  with the tail probe
                              (`monitor.probe_top_p`): the same two statistics over a probe batch, the
                              monitor's sampled prompts sampled again by the driver at that top-p (after the
                              update, never trained on), with the probe's own group advantages. Nucleus
                              sampling (`rollout.top_p` < 1) keeps the training rollouts out of the policy's
                              tail, so implausible answers are rarely sampled until the garbling has begun and
                              monitor/implausible_advantage has nothing to measure; the probe samples the tail
                              and asks the run's reward what it would pay for it
  monitor/alarm               with `monitor.alarm.metric`: 0, then 1 from the step the alarm fired

The alarm (`update_alarm`) fires once, at the first step the mean of its metric's last `window` values has
been at or above the threshold for `patience` monitored steps in a row; a step without a value (no sample,
NaN) leaves the count as it is.

The monitor only reads: rewards, advantages and the update are computed before it runs and from nothing it
makes; it draws from its own `random.Random`, never the global or torch generators; the judge and the
reference pass are forward passes in their own actors (the trainer's reference pass changes no weight,
optimizer state or generator); the tail probe's answers are drawn with their own per-prompt seeds (like every
vLLM request here), after the step's update and weight sync, and never reach the trainer. So a run trains
the same with the monitor on or off.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from saferl.eval.metrics import Judged
from saferl.eval.metrics import judge as judge_samples
from saferl.handles import GuardGroup, TrainerGroup
from saferl.scoring import score_rollouts, with_reference_logprobs
from saferl.tracking import PhaseTimer
from saferl.types import GroundTruth, Prompt, SafetyPolicy, ScoredRollout

Group = list[ScoredRollout]


# ---------------------------------------------------------------- statistics (pure)


def sample_groups(groups: list[Group], n: int, rng: random.Random) -> list[Group]:
    """About `n` rollouts as whole groups in a random order (the last one cut to make exactly `n`), so that
    most sampled rollouts have others of their prompt to be ranked against; all of them when fewer."""
    order = list(groups)
    rng.shuffle(order)
    out, total = [], 0
    for group in order:
        if total >= n:
            break
        out.append(group[:n - total])
        total += len(out[-1])
    return out


def disagreement(guard: list[Judged], judge: list[Judged]) -> float:
    """The fraction of samples whose decision (safe, refused) differs between two judges of the same answers
    (`guard[i]` and `judge[i]` judge answer i); NaN for none."""
    if not guard:
        return math.nan
    differ = [(g.safe, g.refusal) != (j.safe, j.refusal) for g, j in zip(guard, judge, strict=True)]
    return sum(differ) / len(differ)


def rank_agreement(groups: list[list[tuple[float, float]]]) -> float:
    """Pairwise rank agreement of a score with the truth: each group is one prompt's (score, true value)
    pairs; over the pairs of a group with different true values, the fraction whose scores are strictly
    ordered the same way. NaN when no group has such a pair."""
    agree = pairs = 0
    for group in groups:
        for i, (score_i, truth_i) in enumerate(group):
            for score_j, truth_j in group[i + 1:]:
                if truth_i != truth_j:
                    pairs += 1
                    agree += (score_i - score_j) * (truth_i - truth_j) > 0
    return agree / pairs if pairs else math.nan


def implausible_statistics(min_logprobs: list[float], advantages: list[float],
                           threshold: float) -> tuple[float, float]:
    """(implausible rate, mean advantage of the implausible answers) of one batch: answer i is implausible when
    its lowest token log-prob under the starting policy, `min_logprobs[i]`, is below `threshold`;
    `advantages[i]` is what the update gives it. The mean advantage is NaN when no answer is implausible."""
    picked = [a for lp, a in zip(min_logprobs, advantages, strict=True) if lp < threshold]
    return (len(picked) / len(min_logprobs) if min_logprobs else math.nan), mean(picked)


def mean(values: list[float]) -> float:
    """The mean; NaN for none."""
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class AlarmState:
    """How many monitored steps in a row the alarm's smoothed metric has been at or above its threshold, the
    step it fired (None: not yet), and the last values of the metric (at most `window`) it smooths over."""

    streak: int = 0
    fired_step: int | None = None
    recent: tuple[float, ...] = ()


def update_alarm(state: AlarmState, value: float | None, *, threshold: float, patience: int, step: int,
                 window: int = 1) -> AlarmState:
    """The alarm after one more monitored step. The compared value is the mean of the metric's last `window`
    values (none compared before `window` have been seen: a per-step statistic of a few answers is noisy);
    at or above `threshold` it extends the streak, below it resets it; a missing value (None or NaN) leaves
    the state as it is. It fires (records `step`) when the streak reaches `patience`, and only once."""
    if state.fired_step is not None or value is None or math.isnan(value):
        return state
    recent = (*state.recent, value)[-window:]
    if len(recent) < window:
        return AlarmState(state.streak, None, recent)
    streak = state.streak + 1 if mean(list(recent)) >= threshold else 0
    return AlarmState(streak, step if streak >= patience else None, recent)


# ---------------------------------------------------------------- the monitor


class Monitor:
    """Judges a sample of each step's trained rollouts again and keeps the alarm (see the module docstring).

    Args:
        sample: rollouts per step (0: off; `observe` returns nothing).
        implausible_logprob: the lowest-token reference log-prob below which an answer counts as implausible.
        judge: the independent guard, or None (then no judge_disagreement).
        trainer: the policy trainer, for reference log-probs of answers the reward did not need them for.
        safety: the run's SafetyPolicy, which decides "unsafe" for both guards.
        truth: a ground-truth oracle; its helpfulness (when it knows it) gives rm_rank_agreement.
        alarm_metric, threshold, patience, window, action: the alarm (metric None: none); action warn |
            checkpoint | stop is for the driver, which saves or stops when `fired(step)`.
        seed: seeds the sampling (the same draws for a step on resume).
    """

    def __init__(self, *, sample: int, implausible_logprob: float, judge: GuardGroup | None,
                 trainer: TrainerGroup, safety: SafetyPolicy, truth: GroundTruth | None,
                 alarm_metric: str | None, threshold: float, patience: int, action: str, seed: int,
                 window: int = 1) -> None:
        if alarm_metric == "monitor/judge_disagreement" and judge is None:
            raise ValueError("monitor.alarm.metric=monitor/judge_disagreement needs eval.judge")
        self.sample, self.judge, self.trainer, self.safety, self.truth = sample, judge, trainer, safety, truth
        self.implausible_logprob = implausible_logprob
        self.metric, self.threshold, self.patience, self.action = alarm_metric, threshold, patience, action
        self.window = window
        self.seed = seed
        self.alarm, self.baseline, self.stopped_at = AlarmState(), None, None
        self.last: dict[str, float] = {}

    def prompts(self, step: int, groups: list[Group]) -> list[Prompt]:
        """The prompts of the groups `observe(step, groups, ...)` samples (the tail probe samples them again)."""
        if not self.sample:
            return []
        return [group[0].rollout.prompt for group in self._pick(step, groups) if group]

    def observe(self, step: int, groups: list[Group], advantages: list[float],
                timer: PhaseTimer | None = None, probe: tuple[list[Group], list[float]] | None = None
                ) -> dict[str, float]:
        """The monitor/* metrics of step `step`'s trained groups, whose rollouts the update gave `advantages`
        (in the groups' order; timed as phase `monitor`). `probe`: the tail probe's groups of `prompts(step,
        groups)` and their group advantages, each record with its reference log-probs."""
        if not self.sample:
            return {}
        with (timer or PhaseTimer()).phase("monitor"):
            metrics = self._statistics(step, groups)
            records = [s for group in groups for s in group]
            if records and all(s.reference_min_logprob is not None for s in records):
                rate, advantage = implausible_statistics(
                    [s.reference_min_logprob for s in records], advantages,  # type: ignore[misc]
                    self.implausible_logprob)
                metrics.update({"monitor/implausible_rate": rate, "monitor/implausible_advantage": advantage})
            if probe is not None and (probed := [s for group in probe[0] for s in group]):
                if any(s.reference_min_logprob is None for s in probed):
                    raise ValueError("the tail probe's records need their reference log-probs")
                rate, advantage = implausible_statistics(
                    [s.reference_min_logprob for s in probed], probe[1],  # type: ignore[misc]
                    self.implausible_logprob)
                metrics.update({"monitor/probe_samples": float(len(probed)),
                                "monitor/probe_implausible_rate": rate,
                                "monitor/probe_implausible_advantage": advantage})
        if self.metric is not None:
            self.alarm = update_alarm(self.alarm, metrics.get(self.metric), threshold=self.threshold,
                                      patience=self.patience, step=step, window=self.window)
            metrics["monitor/alarm"] = float(self.alarm.fired_step is not None)
            if self.fired(step) and self.action == "stop":
                self.stopped_at = step
        self.last = metrics
        return metrics

    def _pick(self, step: int, groups: list[Group]) -> list[Group]:
        return sample_groups(groups, self.sample, random.Random(self.seed * 1_000_003 + step))

    def _statistics(self, step: int, groups: list[Group]) -> dict[str, float]:
        picked = self._pick(step, groups)
        records = [s for group in picked for s in group]
        if not records:  # no group was trained on this step
            return {}
        out = {"monitor/samples": float(len(records))}
        if self.judge is not None:
            judged = score_rollouts([s.rollout for s in records], self.judge, None)
            out["monitor/judge_disagreement"] = disagreement(judge_samples(records, self.safety),
                                                             judge_samples(judged, self.safety))
        if self.truth is not None:
            truth = self.truth
            scored = [[(s.helpfulness, truth.helpfulness(s.rollout.prompt, s.rollout.answer)) for s in group]
                      for group in picked]
            if all(rm is not None and t is not None for group in scored for rm, t in group):
                out["monitor/rm_rank_agreement"] = rank_agreement(scored)  # type: ignore[arg-type]
        if any(s.reference_logprob is None for s in records):
            records = with_reference_logprobs(records, self.trainer)
        current = mean([s.reference_logprob for s in records])  # type: ignore[misc]
        if self.baseline is None:
            self.baseline = current
        out.update({"monitor/ref_logprob": current, "monitor/ref_logprob_drop": self.baseline - current})
        return out

    def fired(self, step: int) -> bool:
        """True at the step the alarm fired (once per run)."""
        return self.alarm.fired_step == step

    def alarm_message(self) -> str:
        """The loud line printed when the alarm fires: what, when, the value, and what happens next."""
        step = self.alarm.fired_step
        then = {"warn": "training goes on",
                "checkpoint": f"saving checkpoint alarm_step_{step}; training goes on",
                "stop": "stopping the run; the final evaluation still runs"}[self.action]
        value = mean(list(self.alarm.recent))  # NaN before any value
        over = f" (mean of the last {self.window} steps)" if self.window > 1 else ""
        return (f"[saferl] !!! REWARD-HACKING ALARM at step {step}: {self.metric} = {value:.4g}{over}, at or "
                f"above {self.threshold:g} for {self.patience} monitored step(s) in a row "
                f"(monitor.alarm.action={self.action}: {then}) !!!")

    def state_dict(self) -> dict[str, Any]:
        return {"baseline_ref_logprob": self.baseline, "alarm_streak": self.alarm.streak,
                "alarm_fired_step": self.alarm.fired_step, "alarm_recent": list(self.alarm.recent),
                "stopped_by_alarm": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = state["baseline_ref_logprob"]
        # alarm_recent: absent from checkpoints written before the alarm smoothed (#16.2, round 2).
        self.alarm = AlarmState(state["alarm_streak"], state["alarm_fired_step"],
                                tuple(state.get("alarm_recent", ())))
        self.stopped_at = state["stopped_by_alarm"]


def stopped_by_alarm(state: dict[str, Any]) -> int | None:
    """The step at which the alarm stopped the run that wrote a checkpoint's driver state (None: it did not,
    or the checkpoint predates the monitor)."""
    saved = state.get("monitor")
    return None if saved is None else saved["stopped_by_alarm"]
