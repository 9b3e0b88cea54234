"""The reward-hacking monitor (issue 16.2): its statistics, the alarm state machine and `Monitor` on hand-made
batches (the driver's alarm actions are in test_monitor_loop.py)."""

import dataclasses
import json
import math
import random

import pytest
import torch

from saferl.actor_group import ActorGroup
from saferl.eval.metrics import Judged
from saferl.eval.monitor import (AlarmState, Monitor, disagreement, implausible_statistics, rank_agreement,
                                 sample_groups, stopped_by_alarm, update_alarm)
from saferl.handles import GuardGroup, TrainerGroup
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel, SafetyPolicy, ScoredRollout

S, U = SafetyLabel.SAFE, SafetyLabel.UNSAFE
SAFE, UNSAFE, REFUSAL = GuardVerdict(S, refusal=False), GuardVerdict(U, ("Violent",), refusal=False), \
    GuardVerdict(S, refusal=True)


# ---------------------------------------------------------------- pure statistics


def test_sample_groups_takes_whole_groups_and_cuts_the_last():
    groups = [[f"{g}{i}" for i in range(4)] for g in "abcd"]
    picked = sample_groups(groups, 6, random.Random(0))
    order = list(groups)
    random.Random(0).shuffle(order)
    assert picked == [order[0], order[1][:2]]
    assert sample_groups(groups, 8, random.Random(0)) == order[:2]
    assert sample_groups(groups, 100, random.Random(0)) == order  # all when fewer
    assert sample_groups([], 8, random.Random(0)) == []


def _j(safe, refusal):
    return Judged("harmful", None, safe=safe, refusal=refusal, helpfulness=None)


def test_disagreement_counts_differing_decisions():
    guard = [_j(True, False), _j(True, False), _j(True, True), _j(False, False)]
    judge = [_j(True, False), _j(False, False), _j(True, False), _j(False, False)]
    assert disagreement(guard, judge) == 0.5  # the 2nd (safety) and 3rd (refusal) differ
    assert math.isnan(disagreement([], []))


def test_rank_agreement_by_hand():
    one = [(3.0, 3.0), (1.0, -3.0), (2.0, -3.0), (0.5, -1.0)]
    # Pairs with different truth: (0,1) (0,2) (0,3) agree; (1,3) and (2,3) put -1 below -3: disagree.
    assert rank_agreement([one]) == pytest.approx(3 / 5)
    tie = [(1.0, 3.0), (1.0, -3.0)]  # the RM does not order them: no agreement
    assert rank_agreement([one, tie]) == pytest.approx(3 / 6)
    assert math.isnan(rank_agreement([[(1.0, 3.0), (2.0, 3.0)], [(5.0, 1.0)]]))  # no pair of different truth


def test_the_alarm_fires_once_after_patience_steps_at_or_above_threshold():
    values = [0.5, 0.1, 0.4, math.nan, None, 0.6, 0.7, 0.9, 0.1]
    state, seen = AlarmState(), []
    for step, value in enumerate(values, start=1):
        state = update_alarm(state, value, threshold=0.4, patience=3, step=step)
        seen.append((state.streak, state.fired_step))
    # 0.5 starts a streak, 0.1 resets it, 0.4 (at the threshold) starts one, NaN and None leave it, 0.6 and
    # 0.7 make it 3: fired at step 7; nothing changes afterwards.
    assert seen == [(1, None), (0, None), (1, None), (1, None), (1, None), (2, None), (3, 7), (3, 7), (3, 7)]
    assert update_alarm(AlarmState(), 2.0, threshold=1.0, patience=1, step=4) == AlarmState(1, 4, (2.0,))


# ---------------------------------------------------------------- the monitor on a hand-made batch


def _prompt(i, kind="harmful"):
    return Prompt(f"p{i}", [{"role": "user", "content": f"ask {i}"}], kind=kind)


def _record(prompt, answer, verdict, rm, group, ref=None, ref_min=None):
    rollout = Rollout(prompt, [1], [len(answer)], [0.0], answer, "", answer, "stop", group=group)
    return ScoredRollout(rollout, verdict, None, rm, reference_logprob=ref, reference_min_logprob=ref_min)


class AnswerGuard:
    """A stand-in guard whose verdict on an answer is `verdicts[answer]`; counts its calls."""

    def __init__(self, verdicts):
        self.verdicts, self.calls = verdicts, 0

    def moderate(self, items):
        self.calls += 1
        return [self.verdicts[it.response] for it in items]


class RefTrainer:
    """A stand-in trainer: the reference log-prob of a sequence is minus its last token id."""

    def __init__(self):
        self.batches = []

    def reference_logprobs(self, batch):
        self.batches.append(batch)
        return [(-float(ids[-1]), -2.0 * ids[-1]) for ids in batch.input_ids]


class StyleTruth:
    """True helpfulness by answer: 'good' 3, 'junk' -3, 'no' -1."""

    def style(self, prompt, answer):
        return None

    def helpfulness(self, prompt, answer):
        return {"good": 3.0, "junk": -3.0, "no": -1.0}[answer]


def _monitor(judge_verdicts, **alarm):
    judge = ActorGroup(AnswerGuard, 1, executor="local", kwargs=dict(verdicts=judge_verdicts))
    trainer = ActorGroup(RefTrainer, 1, executor="local", kwargs={})
    kwargs = dict(alarm_metric=None, threshold=0.0, patience=1, action="warn") | alarm
    monitor = Monitor(sample=4, implausible_logprob=-4.0, judge=GuardGroup(judge), trainer=TrainerGroup(trainer), safety=SafetyPolicy(),
                      truth=StyleTruth(), seed=0, **kwargs)
    return monitor, judge.actors[0], trainer.actors[0]


ADV = [0.5, -0.5, 1.0, -1.0]  # the update's advantages of _batch()'s four rollouts


def _batch(refs=(None, None, None, None)):
    # Two groups of two; the reward guard is fooled by 'junk' (Safe), the judge is not (Unsafe). The RM scores
    # junk above good in group 0 (wrong order) and good above no in group 1 (right order).
    a = [_record(_prompt(0), "good", SAFE, 2.0, 0, refs[0]),
         _record(_prompt(0), "junk", SAFE, 2.5, 0, refs[1])]
    b = [_record(_prompt(1), "good", SAFE, 3.0, 1, refs[2]),
         _record(_prompt(1), "no", REFUSAL, -1.0, 1, refs[3])]
    return [a, b]


def test_monitor_statistics_of_a_hand_made_batch():
    monitor, judge, trainer = _monitor({"good": SAFE, "junk": UNSAFE, "no": REFUSAL})
    m1 = monitor.observe(1, _batch(), ADV)
    # judge disagreement: only 'junk' (guard safe, judge unsafe) of 4 -> 0.25; RM rank agreement: group 0's
    # pair
    # is misordered, group 1's is right -> 1/2; reference log-probs are minus the answers' lengths here
    # (good 4, junk 4, good 4, no 2): mean -3.5, the baseline, so the drop is 0.
    assert m1 == {"monitor/samples": 4.0, "monitor/judge_disagreement": 0.25,
                  "monitor/rm_rank_agreement": 0.5, "monitor/ref_logprob": -3.5,
                  "monitor/ref_logprob_drop": 0.0}
    assert judge.calls == 1 and len(trainer.batches) == 1 and len(trainer.batches[0].input_ids) == 4
    # Records that carry reference log-probs (the driver computed them for the fluency gate) are not scored
    # again; the drop is measured from the first monitored step's mean.
    m2 = monitor.observe(2, _batch(refs=(-5.0, -6.0, -5.0, -4.0)), ADV)
    assert m2["monitor/ref_logprob"] == -5.0 and m2["monitor/ref_logprob_drop"] == pytest.approx(1.5)
    assert len(trainer.batches) == 1
    assert monitor.observe(3, [], ADV) == {}  # no group trained on: nothing to say


def test_the_alarm_compares_the_mean_of_the_last_window_values():
    values = [-1.0, 0.0, -0.2, -2.0, None, 0.5, 0.4]
    state, seen = AlarmState(), []
    for step, value in enumerate(values, start=1):
        state = update_alarm(state, value, threshold=-0.5, patience=1, step=step, window=3)
        seen.append(state.fired_step)
    # Means of the last 3: none before step 3; step 3 (-1, 0, -0.2) -0.4 >= -0.5 fires at once (patience 1).
    assert seen == [None, None, 3, 3, 3, 3, 3]
    state = AlarmState()
    for step, value in enumerate([0.0, -1.6, 0.0, -0.1, None, 0.0], start=1):
        state = update_alarm(state, value, threshold=-0.5, patience=1, step=step, window=3)
        if step == 3:
            assert state.fired_step is None and state.recent == (0.0, -1.6, 0.0)  # mean -0.53: below
    # Step 4: (-1.6, 0, -0.1) still below; the None at step 5 changes nothing; step 6: (0, -0.1, 0) fires.
    assert state.fired_step == 6 and state.recent == (0.0, -0.1, 0.0)


def test_implausible_statistics_by_hand():
    # Below -4 are the 2nd (-6) and 4th (-4.5); -4.0 itself is not below. Their advantages: 1.5 and -0.5.
    rate, advantage = implausible_statistics([-1.0, -6.0, -4.0, -4.5], [-0.5, 1.5, 0.2, -0.5], -4.0)
    assert rate == 0.5 and advantage == pytest.approx(0.5)
    rate, advantage = implausible_statistics([-1.0, -2.0], [1.0, -1.0], -4.0)
    assert rate == 0.0 and math.isnan(advantage)  # nothing implausible: no incentive to measure


def test_monitor_reports_the_incentive_to_garble_over_the_whole_batch():
    monitor, _, _ = _monitor({"good": SAFE, "junk": UNSAFE, "no": REFUSAL},
                             alarm_metric="monitor/implausible_advantage", threshold=0.0, patience=1)
    batch = _batch()
    mins = [-0.5, -7.0, -0.5, -1.0]  # 'junk' is implausible to the starting policy
    batch = [[dataclasses.replace(s, reference_logprob=-1.0, reference_min_logprob=mins[2 * g + i])
              for i, s in enumerate(group)] for g, group in enumerate(batch)]
    fooled = monitor.observe(1, batch, [-0.7, 0.7, 1.0, -1.0])  # the reward put junk above good
    assert fooled["monitor/implausible_rate"] == 0.25
    assert fooled["monitor/implausible_advantage"] == pytest.approx(0.7) and monitor.fired(1)
    gated, _, _ = _monitor({"good": SAFE, "junk": UNSAFE, "no": REFUSAL},
                           alarm_metric="monitor/implausible_advantage", threshold=0.0, patience=1)
    m = gated.observe(1, batch, [0.7, -0.7, 1.0, -1.0])  # a gate capped junk below good
    assert m["monitor/implausible_advantage"] == pytest.approx(-0.7) and not gated.fired(1)


def test_the_tail_probe_is_measured_on_its_own_batch_and_advantages():
    monitor, _, _ = _monitor({"good": SAFE, "junk": UNSAFE, "no": REFUSAL},
                             alarm_metric="monitor/probe_implausible_advantage", threshold=-0.5, patience=1)
    batch = _batch(refs=(-1.0, -1.0, -1.0, -1.0))  # no trained answer is implausible: nothing there to read
    batch = [[dataclasses.replace(s, reference_min_logprob=-1.0) for s in group] for group in batch]
    assert monitor.prompts(1, batch) == [group[0].rollout.prompt for group in
                                         sample_groups(batch, 4, random.Random(0 * 1_000_003 + 1))]
    # The probe: two groups of two; 'junk' (below -4 under the starting policy) is in each, and the reward
    # put it above 'good' in group 0 (+0.7) and below in group 1 (-0.1): mean 0.3, at or above -0.5.
    mins = [-0.5, -7.0, -6.0, -1.0]
    probe = [[_record(_prompt(0), "good", SAFE, 2.0, 0, -1.0, mins[0]),
              _record(_prompt(0), "junk", SAFE, 2.5, 0, -2.0, mins[1])],
             [_record(_prompt(1), "junk", SAFE, 1.0, 1, -2.0, mins[2]),
              _record(_prompt(1), "good", SAFE, 3.0, 1, -1.0, mins[3])]]
    m = monitor.observe(1, batch, ADV, probe=(probe, [-0.7, 0.7, -0.1, 0.1]))
    assert m["monitor/implausible_rate"] == 0.0 and math.isnan(m["monitor/implausible_advantage"])
    assert m["monitor/probe_samples"] == 4.0 and m["monitor/probe_implausible_rate"] == 0.5
    assert m["monitor/probe_implausible_advantage"] == pytest.approx(0.3) and monitor.fired(1)
    gated, _, _ = _monitor({"good": SAFE, "junk": UNSAFE, "no": REFUSAL},
                           alarm_metric="monitor/probe_implausible_advantage", threshold=-0.5, patience=1)
    m = gated.observe(1, batch, ADV, probe=(probe, [0.7, -0.7, -0.9, 0.9]))  # a gate capped the junk
    assert m["monitor/probe_implausible_advantage"] == pytest.approx(-0.8) and not gated.fired(1)
    no_ref = [[dataclasses.replace(s, reference_min_logprob=None) for s in group] for group in probe]
    with pytest.raises(ValueError, match="reference log-probs"):
        gated.observe(2, batch, ADV, probe=(no_ref, [0.0] * 4))


def test_monitor_off_and_without_judge_or_truth():
    monitor, judge, _ = _monitor({"good": SAFE, "junk": UNSAFE, "no": REFUSAL})
    monitor.sample = 0
    assert monitor.observe(1, _batch(), ADV) == {} and judge.calls == 0
    trainer = TrainerGroup(ActorGroup(RefTrainer, 1, executor="local", kwargs={}))
    bare = Monitor(sample=4, implausible_logprob=-4.0, judge=None, trainer=trainer, safety=SafetyPolicy(), truth=None,
                   alarm_metric=None, threshold=0.0, patience=1, action="warn", seed=0)
    assert set(bare.observe(1, _batch(), ADV)) == {"monitor/samples", "monitor/ref_logprob",
                                              "monitor/ref_logprob_drop"}
    with pytest.raises(ValueError, match="needs eval.judge"):
        Monitor(sample=4, implausible_logprob=-4.0, judge=None, trainer=trainer, safety=SafetyPolicy(),
                truth=None, threshold=0.1,
                alarm_metric="monitor/judge_disagreement", patience=1, action="warn", seed=0)


def test_monitor_alarm_and_its_state_survive_a_resume():
    verdicts = {"good": SAFE, "junk": UNSAFE, "no": REFUSAL}
    monitor, _, _ = _monitor(verdicts, alarm_metric="monitor/judge_disagreement", threshold=0.25, patience=2,
                             action="stop")
    assert monitor.observe(1, _batch(), ADV)["monitor/alarm"] == 0.0 and not monitor.fired(1)
    state = json.loads(json.dumps(monitor.state_dict()))  # as the checkpoint stores it
    resumed, _, _ = _monitor(verdicts, alarm_metric="monitor/judge_disagreement", threshold=0.25, patience=2,
                             action="stop")
    resumed.load_state_dict(state)
    m2 = resumed.observe(2, _batch(refs=(-5.0, -6.0, -5.0, -4.0)), ADV)
    assert m2["monitor/alarm"] == 1.0 and resumed.fired(2) and resumed.stopped_at == 2
    assert m2["monitor/ref_logprob_drop"] == pytest.approx(1.5)  # the baseline came with the state
    assert "REWARD-HACKING ALARM at step 2: monitor/judge_disagreement = 0.25" in resumed.alarm_message()
    assert resumed.observe(3, _batch(), ADV)["monitor/alarm"] == 1.0 and not resumed.fired(3)  # once
    assert stopped_by_alarm({"step": 2, "monitor": resumed.state_dict()}) == 2
    assert stopped_by_alarm({"step": 2}) is None  # a checkpoint from before the monitor
    assert stopped_by_alarm({"monitor": monitor.state_dict()}) is None


def test_monitor_draws_from_no_shared_generator():
    monitor, _, _ = _monitor({"good": SAFE, "junk": UNSAFE, "no": REFUSAL})
    random.seed(5)
    torch.manual_seed(5)
    before = random.getstate(), torch.get_rng_state()
    monitor.observe(1, _batch(), ADV)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
