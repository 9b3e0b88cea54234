"""The run's placement-group bundles (one per Ray actor) and the first-fit explanation of a group Ray could not
place, against hand-computed values; no Ray."""

import os

import pytest

from saferl.cluster import Node, Reservation, unplaced_message
from saferl.config import ConfigError, load_config
from saferl.placement import Bundle, bundles, first_fit, format_plan
from saferl.roles import role_specs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = os.path.join(ROOT, "configs", "toy.yaml")


def _labels(bs):
    return [(b.label(), b.resources) for b in bs]


def test_toy_config_bundles_by_hand():
    # configs/toy.yaml: 2 engines x 0.5 CPU, guard 0.125, RM 0.125 (its ensemble members live in the same
    # actor), trainer 0.5, judge 0.125; no GPUs, so no GPU key (Ray refuses zero-only bundles).
    specs = role_specs(load_config(TOY), build=False)
    assert _labels(bundles(specs)) == [("rollout[0]", {"CPU": 0.5}), ("rollout[1]", {"CPU": 0.5}),
                                       ("guard[0]", {"CPU": 0.125}), ("helpfulness[0]", {"CPU": 0.125}),
                                       ("trainer[0]", {"CPU": 0.5}), ("judge[0]", {"CPU": 0.125})]


def test_bundles_follow_actors_gpus_and_tensor_parallel():
    cfg = load_config(None, ["rollout.num_engines=2", "rollout.gpus_per_engine=1", "rollout.tensor_parallel_size=2",
                             "rollout.cpus_per_engine=1", "guard.num_actors=2", "guard.gpus_per_actor=0.5",
                             "guard.cpus_per_actor=0", "trainer.workers=2", "trainer.gpus=1", "trainer.cpus=2"])
    got = _labels(bundles(role_specs(cfg, build=False)))
    assert got[:4] == [("rollout[0]", {"CPU": 1.0, "GPU": 2.0}), ("rollout[1]", {"CPU": 1.0, "GPU": 2.0}),
                       ("guard[0]", {"GPU": 0.5}), ("guard[1]", {"GPU": 0.5})]
    assert got[-2:] == [("trainer[0]", {"CPU": 2.0, "GPU": 1.0}), ("trainer[1]", {"CPU": 2.0, "GPU": 1.0})]


def test_no_bundles_in_process_for_remote_clients_or_for_actors_asking_nothing():
    assert bundles(role_specs(load_config(TOY, ["run.executor=local"]), build=False)) == []
    remote = load_config(TOY, ["guard.backend=http", "guard.urls=[http://127.0.0.1:1]", "eval.judge=null",
                               "helpfulness.cpus_per_actor=0"])
    assert [b.label() for b in bundles(role_specs(remote, build=False))] == ["rollout[0]", "rollout[1]", "trainer[0]"]
    assert Reservation(None, []).scheduling(role_specs(remote, build=False)[0]) is None


def test_first_fit_packs_the_toy_roles_onto_two_one_cpu_nodes():
    # Largest first: both engines fill node a, the trainer and the three scorers go to b (0.125 left).
    placed, left = first_fit(bundles(role_specs(load_config(TOY), build=False)), {"a": {"CPU": 1.0},
                                                                                   "b": {"CPU": 1.0}})
    assert left == []
    assert placed == {"rollout[0]": "a", "rollout[1]": "a", "trainer[0]": "b", "guard[0]": "b",
                      "helpfulness[0]": "b", "judge[0]": "b"}


def test_first_fit_names_what_fits_nowhere_and_places_gpus_first():
    wanted = [Bundle("rollout", 0, {"CPU": 0.6}), Bundle("rollout", 1, {"CPU": 0.6}), Bundle("trainer", 0, {"CPU": 0.55}),
              Bundle("guard", 0, {"CPU": 0.125}), Bundle("helpfulness", 0, {"CPU": 0.125})]
    free = {"a": {"CPU": 1.0}, "b": {"CPU": 1.0}}
    placed, left = first_fit(wanted, free)  # 2.0 CPUs of 2.0, but three bundles over half a node
    assert [b.label() for b in left] == ["trainer[0]"]
    assert placed == {"rollout[0]": "a", "rollout[1]": "b", "guard[0]": "a", "helpfulness[0]": "a"}
    assert free == {"a": {"CPU": 1.0}, "b": {"CPU": 1.0}}  # not modified
    gpu = [Bundle("guard", 0, {"CPU": 1.0}), Bundle("trainer", 0, {"CPU": 0.5, "GPU": 1.0})]
    placed, left = first_fit(gpu, {"cpu": {"CPU": 1.0}, "gpu": {"CPU": 1.0, "GPU": 1.0}})
    assert left == [] and placed == {"trainer[0]": "gpu", "guard[0]": "cpu"}


def test_unplaced_message_names_the_role_its_keys_and_every_node():
    wanted = [Bundle("rollout", 0, {"CPU": 0.6}), Bundle("rollout", 1, {"CPU": 0.6}), Bundle("trainer", 0, {"CPU": 0.55})]
    nodes = [Node("aaaaaaaa11", "127.0.0.1", {"CPU": 1.0}, {"CPU": 1.0}),
             Node("bbbbbbbb22", "127.0.0.1", {"CPU": 1.0, "GPU": 1.0}, {"CPU": 0.75, "GPU": 1.0})]
    msg = unplaced_message(wanted, "PACK", 30.0, nodes)
    assert "within 30s (ray.placement_timeout_s; strategy PACK" in msg
    assert "No node has room for trainer[0] (CPU 0.55)" in msg and "trainer.cpus / trainer.gpus" in msg
    assert "rollout.cpus_per_engine" not in msg  # the engines fit: only the trainer's keys are named
    assert "node aaaaaaaa (127.0.0.1): CPU 1 free of 1, GPU 0 free of 0" in msg
    assert "node bbbbbbbb (127.0.0.1): CPU 0.75 free of 1, GPU 1 free of 1" in msg
    spread = unplaced_message(wanted, "STRICT_SPREAD", 5.0, nodes)
    assert "each bundle on its own node: 3 bundles, 2 nodes" in spread


def test_dry_run_prints_the_bundles_and_the_strategy(capsys):
    from saferl.cli.main import main

    assert main(["train", "--dry-run", "-c", TOY, "ray.placement_strategy=SPREAD"]) == 0
    out = capsys.readouterr().out
    assert "placement group: 6 bundles, strategy SPREAD (ray.placement_strategy)" in out
    assert [line.split()[1:] for line in out.splitlines() if line.strip().startswith("bundle ")] == [
        ["0", "rollout[0]", "CPU", "0.5"], ["1", "rollout[1]", "CPU", "0.5"], ["2", "guard[0]", "CPU", "0.125"],
        ["3", "helpfulness[0]", "CPU", "0.125"], ["4", "trainer[0]", "CPU", "0.5"], ["5", "judge[0]", "CPU", "0.125"]]
    cfg = load_config(TOY, ["run.executor=local"])
    assert "placement group" not in format_plan(role_specs(cfg, build=False), cfg)


def test_placement_keys_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"ray.placement_strategy' must be one of \('PACK', 'SPREAD'"):
        load_config(None, ["ray.placement_strategy=pack"])
    with pytest.raises(ConfigError, match="ray.placement_timeout_s"):
        load_config(None, ["ray.placement_timeout_s=0"])
    assert load_config(None).ray.placement_strategy == "PACK"
