import json

from saferl.tracking import PhaseTimer, Tracker


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


def test_phase_timer_accumulates():
    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("guard"):
            pass
    assert set(timer.metrics()) == {"timing/guard"} and timer.metrics()["timing/guard"] >= 0
