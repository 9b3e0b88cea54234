"""The independent judge (`eval.judge`, issue 16.1): its config section, its role, and which verdicts feed which
held-out metric when the judge and the reward guard disagree."""

import os

import pytest

from saferl.actor_group import ActorGroup
from saferl.config import ConfigError, load_config
from saferl.eval.metrics import before_after_table
from saferl.eval.policy_eval import evaluate
from saferl.handles import GuardGroup, RolloutGroup
from saferl.placement import format_plan, requests
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel, SafetyPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S, U = SafetyLabel.SAFE, SafetyLabel.UNSAFE


# ---------------------------------------------------------------- config


def test_a_partial_judge_section_takes_guard_config_defaults(tmp_path):
    yaml = tmp_path / "judge.yaml"
    yaml.write_text("eval:\n  judge:\n    model: /models/judge\n    backend: hf\n")
    cfg = load_config(yaml)
    assert cfg.eval.judge.model == "/models/judge" and cfg.eval.judge.backend == "hf"
    assert cfg.eval.judge.max_new_tokens == 32 and cfg.eval.judge.cpus_per_actor == 0.25  # GuardConfig's
    assert load_config(yaml, ["eval.judge.model=/other"]).eval.judge.model == "/other"
    assert load_config(yaml, ["eval.judge=null"]).eval.judge is None
    # An override alone creates the section, also with the defaults.
    alone = load_config(None, ["eval.judge.model=/m"]).eval.judge
    assert (alone.model, alone.backend, alone.num_actors) == ("/m", "vllm", 1)
    assert load_config(None).eval.judge is None  # off by default


@pytest.mark.parametrize("overrides, message", [
    (["eval.judge.modle=/m"], "Unknown config key 'eval.judge.modle'.*'eval.judge.model'"),
    (["eval.judge.backend=tgi"], "'eval.judge.backend' must be one of"),
    (["eval.judge.num_actors=0"], "'eval.judge.num_actors' must be >= 1"),
    (["eval.judge.backend=openai"], "'eval.judge.urls' must be at least one endpoint"),
    (["eval.judge.max_new_tokens=64", "eval.judge.max_model_len=64"], "'eval.judge.max_new_tokens' must be less"),
])
def test_a_bad_judge_value_names_its_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_judge_checks_are_skipped_while_it_is_off():
    # Without a judge its keys read as None, which every choice and range of eval.judge.* refuses: they must be
    # skipped (this failed before _off), and set again they are checked.
    assert load_config(None, ["eval.judge=null"]).eval.judge is None
    with pytest.raises(ConfigError, match="eval.judge.retries"):
        load_config(None, ["eval.judge=null", "eval.judge.retries=-1"])


# ---------------------------------------------------------------- role


def _model_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000, '
                                   '"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}')
    return str(d)


def test_the_judge_is_a_guard_role_built_like_the_guard(tmp_path, capsys):
    from saferl.cli.main import main
    from saferl.guard.remote import RemoteGuardScorer
    from saferl.guard.scorer import GuardScorer
    from saferl.roles import build_roles, role_specs

    guard, judge = _model_dir(tmp_path, "guard"), _model_dir(tmp_path, "judge")
    models = [f"policy.model={_model_dir(tmp_path, 'policy')}", f"helpfulness.model={_model_dir(tmp_path, 'rm')}",
              f"guard.model={guard}"]
    overrides = [*models, f"eval.judge.model={judge}", "eval.judge.backend=hf",
                 "eval.judge.max_new_tokens=16", "eval.judge.cpus_per_actor=0.125", "eval.judge.num_actors=2"]
    cfg = load_config(None, overrides)
    specs = role_specs(cfg, build=False)
    by_role = {s.role: s for s in specs}
    assert [s.role for s in specs] == ["rollout", "guard", "helpfulness", "trainer", "judge"]
    j, g = by_role["judge"], by_role["guard"]
    assert (j.cls, j.actors, j.cpus, j.model_dir, j.engine) == (GuardScorer, 2, 0.125, judge, "hf")
    assert j.kwargs == {**g.kwargs, "model": judge, "backend": "hf", "max_new_tokens": 16}
    assert main(["train", "--dry-run", *overrides]) == 0
    plan = capsys.readouterr().out
    assert plan == f"config OK: (defaults)\n{format_plan(specs, cfg)}\n"
    assert any(line.split()[:4] == ["judge", "2", "0.125", "0"] for line in plan.splitlines())

    class Stub:
        def __init__(self, spec):
            self.spec, self.name = spec, spec.role

        def call(self, method, *args):
            return [{"errors": 1, "timeouts": 0}] * self.spec.actors if method == "stats" else []

        def restarts(self):
            return 0

        def __len__(self):
            return self.spec.actors

    roles = build_roles(specs, start=Stub)
    assert roles.judge is not None and roles.judge.group.spec is j
    counters = roles.failure_counters()
    assert counters["judge/errors"] == 2.0 and counters["judge/restarts"] == 0.0 and "guard/errors" in counters
    assert build_roles(role_specs(load_config(None, models), build=False),
                       start=Stub).judge is None

    remote = role_specs(load_config(None, ["eval.judge.backend=openai", "eval.judge.urls=[http://10.0.0.9:8000]",
                                           "eval.judge.served_model_name=wildguard"]), build=False)[-1]
    assert (remote.role, remote.cls, remote.executor, remote.model_dir) == ("judge", RemoteGuardScorer, "local",
                                                                            None)
    assert remote.kwargs["protocol"] == "openai" and remote.kwargs["served_model_name"] == "wildguard"


def test_the_toy_config_with_a_judge_fits_two_cpus():
    cfg = load_config(os.path.join(ROOT, "configs", "toy.yaml"),
                      ["eval.judge.model=toyworld:guard", "eval.judge.cpus_per_actor=0.125"])
    from saferl.roles import role_specs

    placed = requests(role_specs(cfg, build=False))
    assert "judge" in placed and sum(n * c for n, c, _ in placed.values()) <= cfg.ray.num_cpus == 2


def test_check_endpoints_checks_a_remote_judge():
    import socket

    from saferl.roles import check_endpoints

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.raises(ConnectionError, match=f"eval.judge.urls.*{dead}"):
        check_endpoints(load_config(None, ["eval.judge.backend=http", f"eval.judge.urls=[{dead}]"]))


# ---------------------------------------------------------------- held-out evaluation


class FakeRollout:
    """Answers prompt p's k-th sample with '<p.id>-<k>'."""

    def generate(self, prompts, n, first_group=0, **sampling):
        return [Rollout(p, [1], [2], [0.0], f"{p.id}-{k}", "", f"{p.id}-{k}", "stop", group=first_group + i)
                for i, p in enumerate(prompts) for k in range(n)]


class ByPromptGuard:
    """A stand-in guard: the verdict on an answer is `verdicts[prompt text]`; records what it was asked."""

    def __init__(self, verdicts):
        self.verdicts, self.asked = verdicts, []

    def moderate(self, items):
        self.asked.append([(it.messages[-1]["content"], it.response) for it in items])
        return [self.verdicts[it.messages[-1]["content"]] for it in items]


class KindTruth:
    """Ground truth by kind: every answer to a harmful prompt is unsafe, every benign one helpful."""

    def style(self, prompt, answer):
        return "unsafe" if prompt.kind == "harmful" else "helpful"


PROMPTS = [Prompt("v", [{"role": "user", "content": "violent ask"}], kind="harmful", category="Violent"),
           Prompt("p", [{"role": "user", "content": "pii ask"}], kind="harmful", category="PII"),
           Prompt("b1", [{"role": "user", "content": "benign one"}], kind="benign"),
           Prompt("b2", [{"role": "user", "content": "benign two"}], kind="benign")]


def _evaluate(judge):
    rollout = RolloutGroup(ActorGroup(FakeRollout, 1, executor="local", kwargs={}))
    # The reward guard is fooled: every answer Safe, no refusal.
    reward_guard = ActorGroup(ByPromptGuard, 1, executor="local", kwargs=dict(verdicts={
        p.text: GuardVerdict(S, refusal=False) for p in PROMPTS}))
    return evaluate(PROMPTS, rollout, GuardGroup(reward_guard), None, safety=SafetyPolicy(), samples=2, seed=0,
                    temperature=1.0, top_p=1.0, max_new_tokens=8, truth=KindTruth(), judge=judge)


def test_the_judge_judges_the_same_answers_and_feeds_only_the_judge_metrics():
    # The judge: the Violent answers Safe (it is fooled there too), the PII ones Unsafe; benign one refused.
    judge = ActorGroup(ByPromptGuard, 1, executor="local", kwargs=dict(verdicts={
        "violent ask": GuardVerdict(S, refusal=False), "pii ask": GuardVerdict(U, ("PII",), refusal=False),
        "benign one": GuardVerdict(S, refusal=True), "benign two": GuardVerdict(S, refusal=False)}))
    m = _evaluate(GuardGroup(judge))
    # The reward guard's rates, unchanged names: all safe, no refusal, fooled on all 4 harmful of 8 answers.
    assert (m["safety_rate"], m["benign_refusal_rate"], m["guard_fooled_rate"]) == (1.0, 0.0, 0.5)
    assert m["safety_rate/PII"] == m["safety_rate/Violent"] == 1.0
    # The judge's, from its own verdicts: PII unsafe, Violent safe, one benign prompt's 2 of 4 answers refused;
    # fooled on the 2 Violent answers of 8.
    assert m["judge_safety_rate"] == 0.5 and m["judge_benign_refusal_rate"] == 0.5
    assert m["judge_safety_rate/PII"] == 0.0 and m["judge_safety_rate/Violent"] == 1.0
    assert m["judge_fooled_rate"] == 0.25 and m["judge_fallback_samples"] == 0.0
    assert "judge_samples" not in m and m["samples"] == 8.0  # counts once: the same answers
    # One judge call over exactly the sampled answers.
    asked = judge.actors[0].asked
    assert asked == [[(p.text, f"{p.id}-{k}") for p in PROMPTS for k in range(2)]]


def test_without_a_judge_no_judge_metrics():
    assert not any(k.startswith("judge_") for k in _evaluate(None))


def test_before_after_table_shows_judge_then_reward_guard_then_ground_truth():
    before = {"judge_safety_rate": 0.5, "judge_benign_refusal_rate": 0.1, "judge_safety_rate/PII": 0.4,
              "safety_rate": 0.6, "benign_refusal_rate": 0.2, "safety_rate/PII": 0.3, "truth_unsafe_rate": 0.4,
              "judge_fooled_rate": 0.1, "guard_fooled_rate": 0.2, "samples": 8.0}
    after = {k: v + 0.25 for k, v in before.items()}
    labels = [line.split("|")[1].strip() for line in before_after_table(before, after).splitlines()[2:]]
    assert labels == ["safety rate (harmful, judge)", "benign refusal rate (judge)", "safety rate: PII (judge)",
                      "safety rate (harmful, reward guard)", "benign refusal rate (reward guard)",
                      "safety rate: PII (reward guard)", "unsafe rate (harmful, ground truth)",
                      "judge fooled (Safe but truly unsafe/garbled)",
                      "reward guard fooled (Safe but truly unsafe/garbled)"]
