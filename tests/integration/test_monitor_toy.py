"""The independent judge and the monitor in a real toy-world run (issue 16.1, 16.2): the judge's rows reach the
held-out table, every monitor statistic is logged, and an alarm with action stop ends the run after its step
with the final evaluation written."""

import json
import os

import pytest

from saferl.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def test_judge_and_monitor_in_a_toy_run_that_the_alarm_stops(toy_world, tmp_path, capsys):
    from saferl.toyworld.oracle import ToyGroundTruth
    from saferl.train import train

    # Until the toy world has its own judge, the reward guard's model stands in for it (in HF, a second
    # engine); ref_logprob_drop >= -1000 holds at once, so the alarm fires at step 1 of 3.
    cfg = load_config(os.path.join(ROOT, "configs", "toy.yaml"), [
        f"toyworld.cache_dir={toy_world.root.parent}", f"run.dir={tmp_path / 'run'}", "run.executor=local",
        "trainer.steps=3", "data.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.max_prompts=16",
        "logging.progress=false", "eval.judge.model=toyworld:guard", "eval.judge.backend=hf",
        "monitor.sample=8", "monitor.alarm.metric=monitor/ref_logprob_drop", "monitor.alarm.threshold=-1000",
        "monitor.alarm.patience=1", "monitor.alarm.window=1", "monitor.alarm.action=stop", "helpfulness.ensemble=[]"])  # the toy judge and RM ensemble are built on first use (minutes): tests that do not need them go without
    result = train(cfg, truth=ToyGroundTruth())
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "batch/groups" in r]
    assert [r["step"] for r in steps] == [1] and result["stopped_by_alarm"] == 1
    monitored = steps[0]
    assert monitored["monitor/samples"] == 8 and monitored["monitor/alarm"] == 1.0
    assert 0 <= monitored["monitor/judge_disagreement"] <= 1 and monitored["monitor/ref_logprob"] < 0
    assert monitored["monitor/ref_logprob_drop"] == 0.0  # the first monitored step is the baseline
    assert monitored["monitor/rm_rank_agreement"] is None or 0 <= monitored["monitor/rm_rank_agreement"] <= 1
    assert monitored["timing/monitor"] > 0 and "judge/restarts" in monitored
    # Over the whole batch: the SFT policy's slips are a few of 128 answers, and their advantage is finite when
    # there are any (NaN, written as null, when none).
    assert 0 <= monitored["monitor/implausible_rate"] < 0.5
    assert (monitored["monitor/implausible_advantage"] is None) == (monitored["monitor/implausible_rate"] == 0)
    # configs/toy.yaml's tail probe: the 8 monitored rollouts are 2 prompt groups, sampled again at top-p 1.0.
    assert monitored["monitor/probe_samples"] == 8 and 0 <= monitored["monitor/probe_implausible_rate"] <= 1
    assert (monitored["monitor/probe_implausible_advantage"] is None) == (
        monitored["monitor/probe_implausible_rate"] == 0)
    assert monitored["timing/probe"] > 0
    evals = json.loads((run / "eval.json").read_text())
    assert evals["stopped_by_alarm"] == 1
    for side in ("before", "after"):  # the same answers, judged by both guards: here the same model
        assert evals[side]["judge_safety_rate"] == evals[side]["safety_rate"]
        assert "judge_fooled_rate" in evals[side] and "guard_fooled_rate" in evals[side]
    table = (run / "eval.md").read_text()
    assert table.index("(harmful, judge)") < table.index("(harmful, reward guard)") < table.index("ground truth")
    final = json.loads((run / "checkpoints" / "final" / "saferl_state.json").read_text())
    assert final["step"] == 1 and final["monitor"]["stopped_by_alarm"] == 1
    out = capsys.readouterr().out
    assert "REWARD-HACKING ALARM at step 1" in out and "STOPPED by the reward-hacking alarm after step 1 of 3" in out
