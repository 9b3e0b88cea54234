import json
import threading
import time
import types

import pytest

from saferl import tracking
from saferl.tracking import PhaseTimer, Tracker, step_timing, union_seconds


def test_metrics_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(tmp_path, total_steps=2, wandb_mode="offline", project="saferl-test", config={"a": 1},
                      progress=True)
    tracker.log(1, {"reward/reward_mean": 0.5, "eval/x": float("nan")})
    tracker.log(2, {"reward/reward_mean": 0.7})
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["eval/x"] is None  # NaN is written as null: the file stays valid JSON
    assert list((tmp_path / "wandb").glob("offline-run-*")), "offline W&B run directory missing"


def test_phase_timer_accumulates_every_entry(monkeypatch):
    clock = iter([10.0, 11.5, 20.0, 22.0, 30.0, 30.25])  # guard 1.5 s, then guard 2 s, then sync 0.25 s
    monkeypatch.setattr(tracking, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    timer = PhaseTimer()
    for name in ("guard", "guard", "sync"):
        with timer.phase(name):
            pass
    assert timer.metrics() == {"timing/guard": 3.5, "timing/sync": 0.25}


def test_union_seconds_counts_overlaps_once_inside_the_window():
    intervals = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7), (3.0, 4.0)]  # (3, 4) touches (1, 3)
    assert union_seconds(intervals, (0.0, 10.0)) == 5.0
    assert union_seconds(intervals, (1.5, 5.5)) == 3.0  # (1.5, 4) and (5, 5.5)
    assert union_seconds([(20.0, 30.0)], (0.0, 10.0)) == 0.0  # e.g. an evaluation after the step
    assert union_seconds([], (0.0, 10.0)) == 0.0


def test_step_timing_overhead_is_the_time_no_role_computes():
    # Guard scoring overlaps generation, two trainer ranks run in parallel: summed compute (4+3+2+2 = 11 s)
    # exceeds the 10 s step, but some role was busy during 7.5 s of it, so 2.5 s are overhead.
    timing = step_timing((10.0, 20.0), {"rollout": [(10.0, 14.0)], "guard": [(12.0, 15.0)],
                                        "trainer": [(16.0, 18.0), (16.5, 18.5)], "helpfulness": []})
    assert timing == {"timing/step": 10.0, "timing/compute": 7.5, "timing/overhead": 2.5,
                      "timing/overhead_frac": 0.25, "timing/compute/rollout": 4.0, "timing/compute/guard": 3.0,
                      "timing/compute/trainer": 2.5, "timing/compute/helpfulness": 0.0}


class _SleepingRole:
    """A role whose model compute is a sleep, reported as the real roles do."""

    def __init__(self) -> None:
        self.compute_intervals: list[tuple[float, float]] = []

    def work(self, seconds: float) -> None:
        start = time.time()
        time.sleep(seconds)
        self.compute_intervals.append((start, time.time()))

    def record(self, start: float, end: float) -> None:
        self.compute_intervals.append((start, end))

    def pop_compute(self) -> list[tuple[float, float]]:
        out, self.compute_intervals = self.compute_intervals, []
        return out


def _roles(trainer_ranks: int = 1):
    """Roles of local fake-role groups; returns (roles, the groups by role name)."""
    from saferl.actor_group import ActorGroup
    from saferl.handles import GuardGroup, HelpfulnessGroup, RolloutGroup, TrainerGroup
    from saferl.roles import Roles

    group = {name: ActorGroup(_SleepingRole, trainer_ranks if name == "trainer" else 1, executor="local",
                              name=name, kwargs={}) for name in ("rollout", "guard", "helpfulness", "trainer")}
    return Roles(RolloutGroup(group["rollout"]), GuardGroup(group["guard"]), HelpfulnessGroup(group["helpfulness"]),
                 TrainerGroup(group["trainer"])), group


def test_roles_pop_every_actors_intervals_by_role():
    roles, group = _roles(trainer_ranks=2)
    group["rollout"].call("record", 100.0, 104.0)
    group["guard"].call("record", 102.0, 105.0)  # scoring overlaps generation
    group["trainer"].actors[0].record(106.0, 108.0)  # two data-parallel ranks in parallel
    group["trainer"].actors[1].record(106.5, 108.5)
    group["trainer"].actors[1].record(111.0, 112.0)  # after the step: not its compute
    assert step_timing((100.0, 110.0), roles.pop_compute()) == {
        "timing/step": 10.0, "timing/compute": 7.5, "timing/overhead": 2.5, "timing/overhead_frac": 0.25,
        "timing/compute/rollout": 4.0, "timing/compute/guard": 3.0, "timing/compute/helpfulness": 0.0,
        "timing/compute/trainer": 2.5}
    assert roles.pop_compute() == {name: [] for name in group}  # popped: the next step starts from nothing


def test_overhead_of_a_step_with_known_idle_time():
    roles, group = _roles()
    start = time.time()
    scoring = threading.Thread(target=group["guard"].call, args=("work", 0.3))  # overlaps generation, as on Ray
    scoring.start()
    group["rollout"].call("work", 0.3)
    scoring.join()
    time.sleep(0.2)  # the driver alone: no role computes
    group["trainer"].call("work", 0.1)
    timing = step_timing((start, time.time()), roles.pop_compute())
    # At least the driver's sleep is overhead (the old max(0, 1 - summed compute / step) gave 0 here: the
    # summed 0.7 s exceed the 0.6 s step); more on a loaded machine is scheduling, also overhead.
    assert timing["timing/overhead"] >= 0.2, timing
    assert timing["timing/overhead"] == pytest.approx(timing["timing/step"] - timing["timing/compute"])
    assert timing["timing/compute/rollout"] >= 0.3 and timing["timing/compute/guard"] >= 0.3
    assert timing["timing/compute/trainer"] >= 0.1 and timing["timing/compute/helpfulness"] == 0.0
