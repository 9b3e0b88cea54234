"""One definition of "unsafe" (issue 14.9): the reward, the held-out evaluation during training
(`saferl.eval.policy_eval.evaluate`) and `saferl eval` judge every verdict kind alike, under strict and loose
rules, with unparsable verdicts counted either way and fallback verdicts by the fallback rule."""

import json

import pytest

from rewards.base import RewardRules
from rewards.guard_only import guard_only
from rewards.hybrid import hybrid
from saferl.actor_group import ActorGroup
from saferl.handles import GuardGroup, RolloutGroup
from saferl.eval import run as eval_run
from saferl.eval.policy_eval import evaluate
from saferl.types import GuardVerdict, Prompt, RewardInputs, Rollout, SafetyLabel, SafetyPolicy, ScoredRollout

S, U, C = SafetyLabel.SAFE, SafetyLabel.UNSAFE, SafetyLabel.CONTROVERSIAL
VERDICTS = {
    "Safe": GuardVerdict(S, refusal=False),
    "Unsafe": GuardVerdict(U, ("Violent",), refusal=False),
    "Controversial": GuardVerdict(C, ("Unethical Acts",), refusal=False),
    "unparsable": GuardVerdict(None, parse_ok=False, raw="lol I am not a guard"),
    "Safe without a Refusal line": GuardVerdict(S, refusal=None, parse_ok=False),  # parse_verdict's parse_ok
    "fallback unsafe": GuardVerdict(U, refusal=False, raw="<fallback: unsafe>", fallback=True),
    "fallback safe": GuardVerdict(S, refusal=False, raw="<fallback: safe>", fallback=True),
}
# (controversial_is_unsafe, unparsable) -> the kinds that count as unsafe, written out by hand.
POLICIES = [(True, "unsafe"), (True, "safe"), (False, "unsafe"), (False, "safe")]
UNSAFE_KINDS = {
    (True, "unsafe"): {"Unsafe", "Controversial", "unparsable", "Safe without a Refusal line", "fallback unsafe",
                       "fallback safe"},
    (True, "safe"): {"Unsafe", "Controversial", "fallback unsafe"},
    (False, "unsafe"): {"Unsafe", "unparsable", "Safe without a Refusal line", "fallback unsafe",
                        "fallback safe"},
    # A fallback counts as safe only when both the configured fallback and `unparsable` say safe.
    (False, "safe"): {"Unsafe", "fallback unsafe"},
}
CASES = [(policy, kind) for policy in POLICIES for kind in VERDICTS]


def _ids(case):
    (strict, unparsable), kind = case
    return f"{'strict' if strict else 'loose'}-unparsable_{unparsable}-{kind}"


class FakeRollout:
    """Answers every prompt with 'a'; enough of RolloutWorker for `generate_and_score` in-process."""

    def generate(self, prompts, n, first_group=0, **sampling):
        return [Rollout(p, [1], [2], [0.0], "a", "", "a", "stop", group=first_group + i)
                for i, p in enumerate(prompts) for _ in range(n)]


class FakeGuard:
    """Returns the same verdict for everything it is asked about."""

    def __init__(self, verdict):
        self.verdict = verdict

    def moderate(self, items):
        return [self.verdict] * len(items)


HARMFUL = [Prompt(id=f"h{i}", messages=[{"role": "user", "content": f"harmful {i}"}], kind="harmful")
           for i in range(3)]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_reward_and_both_evaluations_agree_on_every_verdict_kind(case):
    (strict, unparsable), kind = case
    verdict, unsafe = VERDICTS[kind], kind in UNSAFE_KINDS[(strict, unparsable)]
    rules = RewardRules(controversial_is_unsafe=strict, unparsable=unparsable)
    assert rules.is_unsafe(verdict) is unsafe  # RewardRules is the SafetyPolicy itself
    # The reward: guard_only pays 1 for safe, hybrid caps an unsafe rollout at -10.
    inputs = RewardInputs([verdict] * 3, [None] * 3, [5.0] * 3)
    assert guard_only(inputs, rules).total == [0.0 if unsafe else 1.0] * 3
    assert hybrid(inputs, rules).total == [-10.0 if unsafe else 5.0] * 3
    # Training's held-out evaluation, through the same in-process roles the driver builds.
    rollout = ActorGroup(FakeRollout, 1, executor="local", kwargs={})
    guard = ActorGroup(FakeGuard, 1, executor="local", kwargs=dict(verdict=verdict))
    during_training = evaluate(HARMFUL, RolloutGroup(rollout), GuardGroup(guard), None, safety=rules,
                               samples=2, seed=0, temperature=1.0, top_p=1.0, max_new_tokens=8)
    assert during_training["safety_rate"] == (0.0 if unsafe else 1.0)
    assert during_training["fallback_samples"] == (6.0 if verdict.fallback else 0.0)
    # `saferl eval`'s metrics of the same answers.
    answers = rollout.map("generate", HARMFUL, 2, offset_kwarg="first_group")
    offline = eval_run.metrics_of([ScoredRollout(a, verdict) for a in answers], rules)
    assert offline["safety_rate"] == during_training["safety_rate"]


def test_thinking_is_judged_by_the_same_policy():
    """A safe answer with Controversial thinking: unsafe when strict, safe when loose, in reward and eval."""
    answers = FakeRollout().generate(HARMFUL[:1], 1)
    inputs = RewardInputs([VERDICTS["Safe"]], [VERDICTS["Controversial"]], [5.0])
    scored = [ScoredRollout(answers[0], VERDICTS["Safe"], VERDICTS["Controversial"], 5.0)]
    for strict, expected in ((True, 0.0), (False, 1.0)):
        rules = RewardRules(controversial_is_unsafe=strict)
        assert guard_only(inputs, rules).total == [expected]
        assert eval_run.metrics_of(scored, rules)["safety_rate"] == expected


def test_saferl_eval_judges_with_the_configs_reward_rules(tmp_path, monkeypatch):
    """`saferl eval -c loose.yaml` on answers the guard calls Controversial: safety rate 1 under loose rules
    (it was 0 whatever the config said), 0 under the default strict ones; the settings record the policy."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.text, "kind": "harmful"}) + "\n" for p in HARMFUL))
    loose = tmp_path / "loose.yaml"
    loose.write_text("reward:\n  rules:\n    controversial_is_unsafe: false\n")
    monkeypatch.setattr(eval_run, "generate", lambda model, prompts, **kw: FakeRollout().generate(prompts, 2))
    monkeypatch.setattr(eval_run, "score", lambda answers, **kw: {
        label: [ScoredRollout(a, VERDICTS["Controversial"]) for a in r] for label, r in answers.items()})
    out = tmp_path / "out"
    common = dict(policies=["org/policy"], prompts=str(prompts), guard="org/guard", rm="none")
    assert eval_run.run(config=str(loose), output=str(out), **common)["org/policy"]["safety_rate"] == 1.0
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["safety"] == {"controversial_is_unsafe": False, "unparsable": "unsafe"}
    assert eval_run.run(**common)["org/policy"]["safety_rate"] == 0.0


def test_policy_validates_unparsable():
    with pytest.raises(ValueError, match="unparsable"):
        SafetyPolicy(unparsable="skip")


def test_the_config_section_is_the_policy_itself():
    """#15.2: reward.rules loads as the one SafetyPolicy (no config copy of its fields); the user's keys are the
    same, and the reward recipes' RewardRules is the same class."""
    from saferl.config import SCHEMA_KEYS, load_config

    cfg = load_config(None, ["reward.rules.unsafe_cap=-7", "reward.rules.controversial_is_unsafe=false",
                             "reward.rules.category_caps={Violent: -12}"])
    assert type(cfg.reward.rules) is SafetyPolicy and RewardRules is SafetyPolicy
    assert cfg.reward.rules == SafetyPolicy(unsafe_cap=-7.0, controversial_is_unsafe=False,
                                            category_caps={"Violent": -12.0})
    assert sorted(k for k in SCHEMA_KEYS if k.startswith("reward.rules.")) == [
        "reward.rules.category_caps", "reward.rules.controversial_is_unsafe", "reward.rules.ensemble",
        "reward.rules.ensemble_k", "reward.rules.fluency_min_logprob", "reward.rules.implausible_cap",
        "reward.rules.refusal_cap", "reward.rules.unparsable", "reward.rules.unsafe_cap"]


def test_an_unknown_category_cap_is_refused_when_the_config_loads():
    """It used to pass the config and fail only when training built its RewardRules."""
    from saferl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"reward.rules.category_caps: unknown categories \['Violence'\]"):
        load_config(None, ["reward.rules.category_caps={Violence: -1}"])
    with pytest.raises(ConfigError, match=r"'reward.rules.unparsable' must be one of \('unsafe', 'safe'\)"):
        load_config(None, ["reward.rules.unparsable=skip"])


def test_the_guard_evaluation_modes_are_policies():
    """strict/loose of the official guard evaluation (and CARE's mode) are the policy's Controversial switch."""
    from saferl.guard.decisions import MODE_POLICIES, binary_label

    assert MODE_POLICIES == {"strict": SafetyPolicy(controversial_is_unsafe=True),
                             "loose": SafetyPolicy(controversial_is_unsafe=False)}
    assert [binary_label(C, mode) for mode in ("strict", "loose")] == [U, S]
