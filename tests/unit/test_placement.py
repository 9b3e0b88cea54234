import pytest

from saferl.actor_group import check_resources
from saferl.config import load_config
from saferl.placement import count_params, format_plan, requests
from saferl.roles import role_specs


def test_requests_count_tensor_parallel_gpus():
    cfg = load_config(None, ["rollout.num_engines=2", "rollout.gpus_per_engine=1", "rollout.tensor_parallel_size=2",
                             "guard.gpus_per_actor=1", "trainer.gpus=1"])
    specs = role_specs(cfg, build=False)
    req = requests(specs)
    assert req["rollout"] == (2, 0.5, 2.0)
    assert sum(n * g for n, _, g in req.values()) == 6
    assert "total: " in format_plan(specs, cfg) and "6 GPUs" in format_plan(specs, cfg)


def test_check_resources_fails_fast_with_the_numbers():
    req = {"rollout": (2, 1.0, 1.0), "trainer": (1, 1.0, 1.0)}
    check_resources(req, {"CPU": 4.0, "GPU": 3.0})
    with pytest.raises(RuntimeError, match="asks for 3 GPUs but the Ray cluster has 2"):
        check_resources(req, {"CPU": 4.0, "GPU": 2.0})
    with pytest.raises(RuntimeError, match="asks for 3 CPUs"):
        check_resources(req, {"CPU": 2.0, "GPU": 8.0})


def test_param_count_of_a_qwen3_config(tmp_path):
    # Qwen3-0.6B-like shapes: 28 layers, hidden 1024, 16 q / 8 kv heads of 128, ff 3072, vocab 151936, tied.
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 1024, "num_hidden_layers": 28, "vocab_size": 151936, "intermediate_size": 3072,'
        ' "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": true}')
    assert 0.55e9 < count_params(tmp_path / "config.json") < 0.65e9  # Qwen3-0.6B has 0.6B parameters


QWEN_LIKE = ('{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000, "intermediate_size": 128,'
             ' "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true}')


class _RecordingGroup:
    """Stands in for a started ActorGroup; records the role methods called on it."""

    def __init__(self, spec):
        self.spec, self.calls = spec, []

    def __len__(self):
        return self.spec.actors

    def call(self, method, *args):
        self.calls.append((method, args))
        return [("10.0.0.1", 29500)] * self.spec.actors


def test_dry_run_prints_exactly_the_specs_build_roles_starts(tmp_path, capsys):
    """One list of role specs drives both: `--dry-run` prints `format_plan` of them, and `build_roles` starts
    each of them, no more, no other. The helpfulness row names the engine that starts (vllm), the rollout row
    the GPUs each engine actor holds (1 per engine x TP 2)."""
    from saferl.cli.main import main
    from saferl.roles import build_roles, role_specs

    models = {}
    for name in ("policy", "guard", "rm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(QWEN_LIKE)
        models[name] = str(tmp_path / name)
    overrides = [f"policy.model={models['policy']}", f"guard.model={models['guard']}",
                 f"helpfulness.model={models['rm']}", "helpfulness.backend=vllm", "rollout.num_engines=2",
                 "rollout.gpus_per_engine=1", "rollout.tensor_parallel_size=2", "guard.num_actors=3",
                 "guard.gpus_per_actor=0.5", "trainer.workers=2", "trainer.gpus=1"]
    assert main(["train", "--dry-run", *overrides]) == 0
    printed = capsys.readouterr().out
    cfg = load_config(None, overrides)
    specs = role_specs(cfg, build=False)
    assert printed == f"config OK: (defaults)\n{format_plan(specs, cfg)}\n"

    started = []
    roles = build_roles(specs, start=lambda spec: started.append(spec) or _RecordingGroup(spec))
    assert started == specs
    lines = printed.splitlines()
    total = next(i for i, line in enumerate(lines) if line.startswith("total: "))
    rows = {line.split()[0]: line.split() for line in lines[3:total]}
    assert {s.role: [s.role, str(s.actors), f"{s.cpus:g}", f"{s.gpus:g}", s.engine] for s in started} == {
        role: row[:5] for role, row in rows.items()}
    assert rows["helpfulness"][4] == "vllm" and started[2].kwargs["backend"] == "vllm"
    assert rows["rollout"][1:4] == ["2", f"{cfg.rollout.cpus_per_engine:g}", "2"]
    assert started[0].kwargs["tensor_parallel_size"] == 2 and started[0].gpus == 2
    gpus = 2 * 2 + 3 * 0.5 + cfg.helpfulness.num_actors * cfg.helpfulness.gpus_per_actor + 2 * 1
    assert lines[total].endswith(f", {gpus:g} GPUs")
    # Then the placement group: one bundle per Ray actor holding what it asks for (TP 2: 2 GPUs per engine).
    assert lines[total + 1] == f"placement group: {2 + 3 + cfg.helpfulness.num_actors + 2} bundles, strategy PACK (ray.placement_strategy)"
    assert lines[total + 2].split() == ["bundle", "0", "rollout[0]", "CPU", f"{cfg.rollout.cpus_per_engine:g}", "GPU", "2"]
    # Two trainer ranks: build_roles rendezvoused them at rank 0's address.
    assert roles.trainer.group.calls == [("address", ()), ("connect", (("10.0.0.1", 29500),))]


class _Recorder:
    def __init__(self, rank, **kwargs):
        self.rank, self.kwargs = rank, kwargs


def test_start_group_builds_what_the_spec_says():
    from saferl.placement import RoleSpec
    from saferl.roles import start_group

    spec = RoleSpec("trainer", _Recorder, 3, "local", 1.0, 0.0, dict(model="m", lr=0.1), "m", None, "torch",
                    "float32", rank_kwarg="rank")
    group = start_group(spec)
    assert group.name == "trainer" and [(a.rank, a.kwargs) for a in group.actors] == [
        (i, dict(model="m", lr=0.1)) for i in range(3)]


@pytest.mark.parametrize("overrides", [[], ["guard.backend=http", "guard.urls=[http://127.0.0.1:1]",
                                            "helpfulness.backend=http", "helpfulness.urls=[http://127.0.0.1:2]"]],
                         ids=["in-process", "remote"])
def test_every_role_class_meets_the_role_contract(overrides):
    """`Roles.pop_compute` asks every role for its compute intervals and `Roles.failure_counters` asks the guard
    and the RM for their counters, so each class a run starts must have them (in-process and remote alike)."""
    from saferl.handles import Role, Scorer
    from saferl.roles import role_specs

    specs = role_specs(load_config(None, overrides), build=False)
    assert [s.role for s in specs] == ["rollout", "guard", "helpfulness", "trainer"]
    assert all(issubclass(s.cls, Role) for s in specs)
    assert [issubclass(s.cls, Scorer) for s in specs] == [False, True, True, False]
