"""The mitigations of #16.4 on the built toy world: the RM actor hosting an ensemble (the toy reward model
twice), and a short in-process run with the ensemble and the fluency gate on, through the real driver."""

import json
import os

import pytest

from saferl.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def test_an_rm_with_members_returns_one_score_per_member(toy_world):
    from saferl.data import load_prompts
    from saferl.helpfulness import HelpfulnessScorer
    from saferl.toyworld import world

    prompts = load_prompts(toy_world.part("heldout"))[::60]
    pairs = [(p.messages, texts[0]) for p in prompts for texts in world.responses_for(p).values()]
    rm = str(toy_world.part("reward_model"))
    alone = HelpfulnessScorer(rm).score(pairs)
    out = HelpfulnessScorer(rm, members=(rm,)).score_with_fallbacks(pairs)
    assert len(out) == len(pairs) > 10
    assert all(len(scores) == 2 and not fallback for scores, fallback in out)
    assert [s[0] for s, _ in out] == pytest.approx(alone, abs=1e-6)
    assert [s[1] for s, _ in out] == pytest.approx(alone, abs=1e-6)
    assert max(alone) - min(alone) > 1.0  # real, varied scores


def test_a_run_with_the_ensemble_and_the_gate_fills_reference_logprobs_before_the_reward(toy_world, tmp_path,
                                                                                          monkeypatch):
    import saferl.train
    from saferl.train import train

    applied = []  # what apply_recipe saw: every record must carry its reference log-prob and members
    rewarded = []  # what it returned
    apply = saferl.train.apply_recipe

    def recording_apply(recipe, records, rules):
        applied.append(records)
        rewarded.append(apply(recipe, records, rules))
        return rewarded[-1]

    monkeypatch.setattr(saferl.train, "apply_recipe", recording_apply)
    rm = str(toy_world.part("reward_model"))
    cfg = load_config(os.path.join(ROOT, "configs", "toy.yaml"), [
        f"toyworld.cache_dir={toy_world.root.parent}", f"run.dir={tmp_path / 'run'}", "run.executor=local",
        "trainer.steps=1", "data.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.max_prompts=4",
        "logging.progress=false", f"helpfulness.ensemble=[{rm}]", "reward.rules.ensemble=mean_minus_std",
        "reward.rules.fluency_min_logprob=-2.0", "eval.judge=null",
        "rollout.top_p=1.0"])  # tail samples: at configs/toy.yaml's top-p 0.9 these 16 have no token under -2  # the toy judge and RM ensemble are built on first use (minutes): tests that do not need them go without
    train(cfg)
    assert applied and all(r.reference_logprob is not None and r.reference_logprob < 0 and
                           len(r.helpfulness_ensemble) == 1 for records in applied for r in records)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward/reward_mean" in r)
    records = applied[0]
    gated = [r.reference_min_logprob < -2.0 for r in records]
    assert step["reward/implausible_rate"] == pytest.approx(sum(gated) / len(gated))
    assert step["reward/ensemble_spread"] == pytest.approx(0.0, abs=1e-6)  # the same model twice agrees
    assert step["timing/reference"] > 0
    assert any(gated)  # the lowest-token gate at -2 catches some of the SFT policy's own samples
    for r, bad in zip(rewarded[0], gated):
        if bad:
            assert r.reward <= cfg.reward.rules.implausible_cap  # or a lower cap / H
