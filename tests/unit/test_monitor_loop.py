"""The driver's loop with the monitor (issue 16.2) on stand-in roles in one process: the monitor does not
change training, and the alarm's actions warn, checkpoint and stop do what they say."""

import json
import random

import pytest
import torch

from rewards import load_recipe
from saferl.actor_group import ActorGroup
from saferl.config import load_config
from saferl.handles import GuardGroup, HelpfulnessGroup, RolloutGroup, TrainerGroup
from saferl.roles import Roles
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel

ANSWERS = ("good", "junk", "no", "bad")
SAFE, UNSAFE = GuardVerdict(SafetyLabel.SAFE, refusal=False), GuardVerdict(SafetyLabel.UNSAFE, refusal=False)
GUARD = {"good": SAFE, "junk": SAFE, "no": GuardVerdict(SafetyLabel.SAFE, refusal=True), "bad": UNSAFE}
JUDGE = {**GUARD, "junk": UNSAFE}  # the judge is not fooled by junk
RM = {"good": 3.0, "junk": 3.5, "no": -1.0, "bad": 3.0}  # the RM is


class Quiet:
    def pop_compute(self):
        return []

    def stats(self):
        return {"errors": 0}

    def ready(self):
        return True


class SharedRngRollout(Quiet):
    """Draws answers from the process's global `random` and `torch` generators, as an in-process role may:
    anything else that drew from them between steps would change the batches."""

    def generate(self, prompts, n, first_group=0, **sampling):
        out = []
        for i, p in enumerate(prompts):
            for _ in range(n):
                answer = ANSWERS[(random.randrange(4) + int(torch.randint(0, 4, ()))) % 4]
                out.append(Rollout(p, [7], [ANSWERS.index(answer) + 1], [0.0], answer, "", answer, "stop",
                                   group=first_group + i))
        return out

    def packed_modules(self):
        return {}

    def begin_weight_update(self):
        pass

    def load_weight_bucket(self, bucket):
        pass

    def finish_weight_update(self):
        pass


class SeededRollout(SharedRngRollout):
    """Draws prompt i's answers from its own generator seeded with `seed + i`, as a vLLM request does (and
    keeps every call's sampling arguments); a junk answer is likelier at top-p 1.0, as the tail is."""

    calls: list[dict] = []

    def generate(self, prompts, n, first_group=0, *, seed, top_p, **sampling):
        out = []
        for i, p in enumerate(prompts):
            rng = random.Random(seed + i)
            for _ in range(n):
                answer = "junk" if rng.random() < (0.5 if top_p == 1.0 else 0.1) else rng.choice(ANSWERS)
                out.append(Rollout(p, [7], [ANSWERS.index(answer) + 1], [0.0], answer, "", answer, "stop",
                                   group=first_group + i))
        self.calls.append(dict(top_p=top_p, seed=seed, prompts=len(prompts), answers=[r.answer for r in out]))
        return out


class Guard(Quiet):
    def __init__(self, verdicts):
        self.verdicts = verdicts

    def moderate(self, items):
        return [self.verdicts[it.response] for it in items]


class Rm(Quiet):
    def score_with_fallbacks(self, pairs):
        return [((RM[answer],), False) for _, answer in pairs]


class Trainer(Quiet):
    def __init__(self):
        self.batches = []

    def train_step(self, batch):
        self.batches.append((batch.input_ids, batch.advantages))
        return {"loss": float(sum(batch.advantages)), "loss_terms": 1.0}

    def reference_logprobs(self, batch):
        return [(-float(ids[-1]), -2.0 * ids[-1]) for ids in batch.input_ids]

    def weight_layout(self):
        return [("w", 7)]

    def weight_bucket(self, names):
        return b"weights"

    def save(self, directory, export):
        from pathlib import Path

        Path(directory).mkdir(parents=True)

    def load(self, directory):
        pass


def _group(cls, name, **kwargs):
    return ActorGroup(cls, 1, executor="local", name=name, kwargs=kwargs)


def _run(tmp_path, name, *overrides, rollout=SharedRngRollout):
    from saferl.train import _loop, prepare_run_dir

    cfg = load_config(None, [f"run.dir={tmp_path / name}", "run.executor=local", "trainer.steps=4",
                             "data.prompts_per_step=2", "rollout.samples_per_prompt=4",
                             "logging.progress=false", "eval.judge.model=unused", *overrides])
    random.seed(0)
    torch.manual_seed(0)
    roles = Roles(RolloutGroup(_group(rollout, "rollout")),
                  GuardGroup(_group(Guard, "guard", verdicts=GUARD)), HelpfulnessGroup(_group(Rm, "helpfulness")),
                  TrainerGroup(_group(Trainer, "trainer")),
                  GuardGroup(_group(Guard, "judge", verdicts=JUDGE)))
    prompts = [Prompt(f"t{i}", [{"role": "user", "content": f"ask {i}"}], kind="benign") for i in range(6)]
    result = _loop(cfg, roles, load_recipe("hybrid"), cfg.reward.rules, prompts, prompts[:2], tmp_path / name,
                   prepare_run_dir(cfg), None)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in rows if "batch/groups" in r], roles.trainer.group.actors[0].batches, cfg


def test_the_monitor_does_not_change_training(tmp_path):
    _, off_rows, off, _ = _run(tmp_path, "off")
    _, on_rows, on, _ = _run(tmp_path, "on", "monitor.sample=6", "monitor.alarm.threshold=0",
                             "monitor.alarm.metric=monitor/judge_disagreement", "monitor.alarm.patience=1")
    assert on == off and len(on) == 4  # the same sequences and advantages at every step
    for a, b in zip(off_rows, on_rows, strict=True):
        assert {k: v for k, v in a.items() if k.startswith("reward/")} == {
            k: v for k, v in b.items() if k.startswith("reward/")}
    assert all("monitor/judge_disagreement" in r and r["monitor/samples"] == 6 for r in on_rows)
    assert not any(k.startswith("monitor/") for r in off_rows for k in r)


def test_the_tail_probe_samples_the_monitored_prompts_again_and_does_not_change_training(tmp_path):
    SeededRollout.calls = []
    _, off_rows, off, _ = _run(tmp_path, "off", "monitor.sample=4", "rollout.top_p=0.9", rollout=SeededRollout)
    assert {c["top_p"] for c in SeededRollout.calls} == {0.9}
    SeededRollout.calls = []
    _, on_rows, on, _ = _run(tmp_path, "on", "monitor.sample=4", "rollout.top_p=0.9", "monitor.probe_top_p=1.0",
                             "monitor.alarm.metric=monitor/probe_implausible_advantage",
                             "monitor.alarm.threshold=-5", rollout=SeededRollout)
    assert on == off and len(on) == 4  # the same sequences and advantages at every step
    for a, b in zip(off_rows, on_rows, strict=True):
        assert {k: v for k, v in a.items() if k.startswith(("reward/", "train/"))} == {
            k: v for k, v in b.items() if k.startswith(("reward/", "train/"))}
    assert not any("monitor/probe_samples" in r for r in off_rows)
    # Each step (after the before-evaluation's call): its training call at top-p 0.9, then the probe at 1.0,
    # with its own seeds, of the one prompt whose group of 4 is the monitor's sample of 4.
    probes = [c for c in SeededRollout.calls if c["top_p"] == 1.0]
    trained = [c for c in SeededRollout.calls[1:] if c["top_p"] == 0.9][:4]
    assert len(probes) == 4 and all(c["prompts"] == 1 for c in probes)
    assert not {c["seed"] for c in probes} & {c["seed"] for c in trained}
    # The stand-in trainer's reference min log-prob is -2 x the answer's token id: 'no' (-6) and 'bad' (-8)
    # are below -4, so the probe's implausible rate is their share of its answers.
    for row, call in zip(on_rows, probes, strict=True):
        assert row["monitor/probe_samples"] == 4.0
        assert row["monitor/probe_implausible_rate"] == sum(a in ("no", "bad") for a in call["answers"]) / 4


ALARM = ["monitor.sample=8", "monitor.alarm.metric=monitor/judge_disagreement", "monitor.alarm.threshold=0",
         "monitor.alarm.patience=2"]  # disagreement >= 0 always: fires at step 2


def test_warn_logs_the_alarm_from_its_step_and_goes_on(tmp_path, capsys):
    result, rows, batches, _ = _run(tmp_path, "warn", *ALARM, "monitor.alarm.action=warn")
    assert [r["monitor/alarm"] for r in rows] == [0.0, 1.0, 1.0, 1.0] and len(batches) == 4
    assert capsys.readouterr().out.count("REWARD-HACKING ALARM at step 2") == 1
    assert result["stopped_by_alarm"] is None
    assert json.loads((tmp_path / "warn" / "eval.json").read_text())["stopped_by_alarm"] is None
    assert not list((tmp_path / "warn" / "checkpoints").glob("alarm_step_*"))


def test_checkpoint_also_saves_alarm_step_n(tmp_path):
    _, _, batches, _ = _run(tmp_path, "ckpt", *ALARM, "monitor.alarm.action=checkpoint")
    ckpts = tmp_path / "ckpt" / "checkpoints"
    assert [p.name for p in ckpts.glob("alarm_step_*")] == ["alarm_step_2"] and len(batches) == 4
    state = json.loads((ckpts / "alarm_step_2" / "saferl_state.json").read_text())
    assert state["step"] == 2 and state["monitor"]["alarm_fired_step"] == 2


def test_stop_ends_the_run_but_evaluates_and_records_why(tmp_path, capsys):
    from saferl.train import prepare_run_dir

    result, rows, batches, cfg = _run(tmp_path, "stop", *ALARM, "monitor.alarm.action=stop")
    assert len(batches) == 2 and [r["step"] for r in rows] == [1, 2]
    out = capsys.readouterr().out
    assert "REWARD-HACKING ALARM at step 2" in out
    assert "STOPPED by the reward-hacking alarm after step 2 of 4" in out
    evals = json.loads((tmp_path / "stop" / "eval.json").read_text())
    assert evals["stopped_by_alarm"] == result["stopped_by_alarm"] == 2 and evals["after"]["samples"] > 0
    assert (tmp_path / "stop" / "eval.md").is_file()
    final = json.loads((tmp_path / "stop" / "checkpoints" / "final" / "saferl_state.json").read_text())
    assert final["step"] == 2 and final["monitor"]["stopped_by_alarm"] == 2
    # The stopped run is finished: running the command again does not resume it.
    assert prepare_run_dir(cfg) is None and (tmp_path / "stop").exists()
    assert len(list(tmp_path.glob("stop.*"))) == 1  # moved aside, as a finished run is
