"""Resume state: atomic checkpoint directories and the `latest` pointer, the prompt sampler's position, and the
truncation of metrics.jsonl on resume (pure CPU, a fake trainer instead of a model)."""

import json
from pathlib import Path

import pytest

from saferl import checkpoint
from saferl.data import PromptSampler
from saferl.tracking import Tracker
from saferl.types import Prompt


class FakeTrainer:
    """Stands in for the PolicyTrainer ranks (`handles.TrainerGroup`): `save(directory, export)` writes a weights
    file."""

    def __init__(self, tag: str = "", fail: bool = False) -> None:
        self.tag, self.fail, self.calls = tag, fail, []

    def save(self, directory, export):
        self.calls.append((directory, export))
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_text(f"weights {self.tag}")
        if self.fail:  # e.g. one rank dies half-way through writing its shard
            raise RuntimeError("rank 1 died while saving")
        (d / "trainer").mkdir(exist_ok=True)


def _root(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def _step_dirs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in _root(tmp_path).iterdir() if p.is_dir())


def test_save_writes_state_points_latest_and_passes_export(tmp_path):
    """A saved checkpoint holds the trainer's files and saferl_state.json; `latest` names it; export is passed."""
    trainer = FakeTrainer("a")
    state = {"step": 10, "sampler": {"epoch": 1, "position": 3}, "workers": 2}
    path = checkpoint.save(tmp_path, "step_10", trainer, state, keep_last=0, export="adapter")
    assert path == _root(tmp_path) / "step_10"
    assert trainer.calls[0][1] == "adapter"
    assert (path / "model.safetensors").read_text() == "weights a"
    assert checkpoint.read_state(path) == state
    assert (_root(tmp_path) / "latest").read_text().strip() == "step_10"
    assert checkpoint.latest(tmp_path) == path
    # The trainer wrote into a hidden staging directory, not into the final one.
    assert Path(trainer.calls[0][0]).name == ".step_10.incomplete"
    assert _step_dirs(tmp_path) == ["step_10"]


def test_latest_names_the_newest(tmp_path):
    """After several saves `latest` names the last one written."""
    for step in (5, 10, 15):
        checkpoint.save(tmp_path, f"step_{step}", FakeTrainer(), {"step": step}, keep_last=0, export="merged")
        assert checkpoint.latest(tmp_path) == _root(tmp_path) / f"step_{step}"
    assert checkpoint.read_state(checkpoint.latest(tmp_path))["step"] == 15
    assert _step_dirs(tmp_path) == ["step_10", "step_15", "step_5"]  # keep_last=0 keeps all


def test_latest_is_none_without_checkpoints(tmp_path):
    """No checkpoints directory, or one without a `latest` file, means nothing to resume from."""
    assert checkpoint.latest(tmp_path) is None
    _root(tmp_path).mkdir()
    (_root(tmp_path) / ".step_10.incomplete").mkdir()  # a leftover from a killed save is not a checkpoint
    assert checkpoint.latest(tmp_path) is None


def test_latest_pointing_at_incomplete_checkpoint_raises_naming_it(tmp_path):
    """A `latest` naming a directory without saferl_state.json raises an error that names that directory."""
    root = _root(tmp_path)
    (root / "step_99").mkdir(parents=True)
    (root / "latest").write_text("step_99\n")
    with pytest.raises(FileNotFoundError, match="step_99"):
        checkpoint.latest(tmp_path)
    (root / "latest").write_text("step_7\n")  # names a directory that does not exist at all
    with pytest.raises(FileNotFoundError, match="step_7"):
        checkpoint.latest(tmp_path)


def test_keep_last_prunes_oldest_by_step_number(tmp_path):
    """keep_last=2 keeps the two highest step numbers (numeric order: step_5 < step_10 < step_15)."""
    for step in (5, 10, 15):
        checkpoint.save(tmp_path, f"step_{step}", FakeTrainer(), {"step": step}, keep_last=2, export="merged")
    # Lexicographic order would have pruned step_10 ("step_10" < "step_15" < "step_5").
    assert _step_dirs(tmp_path) == ["step_10", "step_15"]
    checkpoint.save(tmp_path, "step_20", FakeTrainer(), {"step": 20}, keep_last=1, export="merged")
    assert _step_dirs(tmp_path) == ["step_20"]
    assert checkpoint.latest(tmp_path) == _root(tmp_path) / "step_20"


def test_keep_last_never_prunes_final_or_the_newest(tmp_path):
    """`final` is not a step_* and survives pruning; a just-written checkpoint is kept even if its number is low."""
    checkpoint.save(tmp_path, "step_30", FakeTrainer(), {"step": 30}, keep_last=0, export="merged")
    checkpoint.save(tmp_path, "final", FakeTrainer(), {"step": 40}, keep_last=0, export="merged")
    # Re-running from an earlier point writes a lower step number after a higher one.
    checkpoint.save(tmp_path, "step_5", FakeTrainer(), {"step": 5}, keep_last=1, export="merged")
    names = _step_dirs(tmp_path)
    assert "final" in names and "step_5" in names
    assert checkpoint.latest(tmp_path) == _root(tmp_path) / "step_5"
    checkpoint.save(tmp_path, "step_50", FakeTrainer(), {"step": 50}, keep_last=1, export="merged")
    assert _step_dirs(tmp_path) == ["final", "step_50"]


def test_failed_save_keeps_latest_on_previous_checkpoint(tmp_path):
    """A save that fails part-way leaves `latest` on the previous complete checkpoint and no new step dir."""
    checkpoint.save(tmp_path, "step_10", FakeTrainer("old"), {"step": 10}, keep_last=0, export="merged")
    with pytest.raises(RuntimeError, match="died"):
        checkpoint.save(tmp_path, "step_20", FakeTrainer("new", fail=True), {"step": 20}, keep_last=0,
                        export="merged")
    assert not (_root(tmp_path) / "step_20").exists()
    assert (_root(tmp_path) / "latest").read_text().strip() == "step_10"
    good = checkpoint.latest(tmp_path)
    assert good == _root(tmp_path) / "step_10"
    assert checkpoint.read_state(good) == {"step": 10}
    assert (good / "model.safetensors").read_text() == "weights old"
    # Retrying the same name clears the half-written staging directory and succeeds.
    checkpoint.save(tmp_path, "step_20", FakeTrainer("retry"), {"step": 20}, keep_last=0, export="merged")
    assert not (_root(tmp_path) / ".step_20.incomplete").exists()
    assert checkpoint.latest(tmp_path) == _root(tmp_path) / "step_20"
    assert (_root(tmp_path) / "step_20" / "model.safetensors").read_text() == "weights retry"


def test_failed_resave_of_existing_name_keeps_the_old_one(tmp_path):
    """A failed re-save of an existing name leaves the earlier checkpoint of that name intact and current."""
    checkpoint.save(tmp_path, "final", FakeTrainer("v1"), {"step": 4}, keep_last=0, export="merged")
    with pytest.raises(RuntimeError):
        checkpoint.save(tmp_path, "final", FakeTrainer("v2", fail=True), {"step": 8}, keep_last=0, export="merged")
    assert checkpoint.latest(tmp_path) == _root(tmp_path) / "final"
    assert checkpoint.read_state(_root(tmp_path) / "final") == {"step": 4}
    assert (_root(tmp_path) / "final" / "model.safetensors").read_text() == "weights v1"


def test_resaving_an_existing_name_replaces_it(tmp_path):
    """Saving a name that exists replaces its contents and state and leaves no .stale directory behind."""
    checkpoint.save(tmp_path, "final", FakeTrainer("v1"), {"step": 4, "v": 1}, keep_last=0, export="merged")
    checkpoint.save(tmp_path, "final", FakeTrainer("v2"), {"step": 4, "v": 2}, keep_last=0, export="merged")
    final = _root(tmp_path) / "final"
    assert checkpoint.read_state(final) == {"step": 4, "v": 2}
    assert (final / "model.safetensors").read_text() == "weights v2"
    assert sorted(p.name for p in _root(tmp_path).iterdir()) == ["final", "latest"]


def test_leftover_incomplete_dir_of_another_name_is_cleared_by_next_save(tmp_path):
    """The module docstring: a leftover `.incomplete` directory is cleared by the next save."""
    checkpoint.save(tmp_path, "step_10", FakeTrainer(), {"step": 10}, keep_last=0, export="merged")
    with pytest.raises(RuntimeError):
        checkpoint.save(tmp_path, "step_20", FakeTrainer(fail=True), {"step": 20}, keep_last=0, export="merged")
    checkpoint.save(tmp_path, "step_30", FakeTrainer(), {"step": 30}, keep_last=0, export="merged")
    assert not (_root(tmp_path) / ".step_20.incomplete").exists()


# ---- PromptSampler state --------------------------------------------------------------------------------------


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(n)]


def _ids(batch: list[Prompt]) -> list[str]:
    return [p.id for p in batch]


@pytest.mark.parametrize("n_prompts, batch_size, batches_before", [
    (6, 3, 2),   # exactly one epoch consumed: position == len (the epoch-boundary case)
    (6, 6, 1),   # one batch is one whole epoch
    (6, 3, 4),   # two whole epochs
    (7, 3, 1),   # mid-epoch
    (7, 3, 3),   # crossed an epoch boundary inside a batch
])
def test_sampler_resume_matches_uninterrupted_run(n_prompts, batch_size, batches_before):
    """State taken after some batches and restored into a fresh sampler (via JSON, as in a checkpoint) yields
    exactly the batches the uninterrupted sampler yields next."""
    prompts = _prompts(n_prompts)
    live = PromptSampler(prompts, seed=3)
    for _ in range(batches_before):
        live.next_batch(batch_size)
    state = json.loads(json.dumps(live.state_dict()))
    resumed = PromptSampler(prompts, seed=3)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert _ids(resumed.next_batch(batch_size)) == _ids(live.next_batch(batch_size))


def test_sampler_state_at_epoch_end_then_next_epoch_is_fresh_permutation():
    """After exactly one epoch the state is (0, len); the restored sampler's next len prompts are the whole set
    once (epoch 1), not a repeat of epoch 0's tail or a reshuffle of epoch 0."""
    prompts = _prompts(5)
    live = PromptSampler(prompts, seed=11)
    epoch0 = _ids(live.next_batch(5))
    assert sorted(epoch0) == sorted(p.id for p in prompts)
    assert live.state_dict() == {"epoch": 0, "position": 5}
    resumed = PromptSampler(prompts, seed=11)
    resumed.load_state_dict({"epoch": 0, "position": 5})
    epoch1 = _ids(resumed.next_batch(5))
    assert sorted(epoch1) == sorted(epoch0)
    assert resumed.state_dict() == {"epoch": 1, "position": 5}
    # Epoch 1's order is the seeded order for epoch 1, the same one a sampler that never stopped uses.
    assert epoch1 == _ids(live.next_batch(5))
    assert epoch1 != epoch0  # different per-epoch shuffles (seed 11, 5 prompts)


def test_sampler_restore_into_a_used_sampler_overrides_its_position():
    """load_state_dict fully replaces epoch, position and order, even on a sampler that has already been used."""
    prompts = _prompts(7)
    reference = PromptSampler(prompts, seed=0)
    reference.next_batch(4)
    state = reference.state_dict()
    used = PromptSampler(prompts, seed=0)
    for _ in range(5):
        used.next_batch(3)  # now in epoch 2
    used.load_state_dict(state)
    assert used.state_dict() == {"epoch": 0, "position": 4}
    assert _ids(used.next_batch(6)) == _ids(reference.next_batch(6))


# ---- Tracker resume -------------------------------------------------------------------------------------------


def _write_rows(path: Path, steps: list[int]) -> None:
    path.write_text("".join(json.dumps({"step": s, "time": 0.0, "tag": f"old{i}"}) + "\n"
                            for i, s in enumerate(steps)))


def _read_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _tracker(run_dir: Path, start_step: int) -> Tracker:
    return Tracker(run_dir, total_steps=10, wandb_mode="disabled", project="x", config={}, progress=False,
                   start_step=start_step)


def test_tracker_resume_drops_rows_after_start_step(tmp_path):
    """start_step=k removes rows with step > k (logged after the checkpoint), keeps rows <= k, then appends."""
    path = tmp_path / "metrics.jsonl"
    # step 0: eval before; step 3 twice (train + eval row); steps 4, 5 were logged after the step-3 checkpoint.
    _write_rows(path, [0, 1, 2, 3, 3, 4, 5])
    tracker = _tracker(tmp_path, start_step=3)
    assert _read_steps(path) == [0, 1, 2, 3, 3]
    tracker.log(4, {"reward/reward_mean": 0.25})
    tracker.log(5, {"reward/reward_mean": 0.5})
    tracker.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 3, 4, 5]
    assert [r.get("tag") for r in rows[:5]] == ["old0", "old1", "old2", "old3", "old4"]
    assert [r.get("reward/reward_mean") for r in rows[5:]] == [0.25, 0.5]
    assert not (tmp_path / "metrics.tmp").exists()


def test_tracker_without_start_step_appends_to_existing_file(tmp_path):
    """start_step=0 (a fresh run) leaves existing rows alone and appends."""
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, [1, 2, 9])
    tracker = _tracker(tmp_path, start_step=0)
    tracker.log(1, {"a": 1.0})
    tracker.close()
    assert _read_steps(path) == [1, 2, 9, 1]


def test_tracker_resume_without_metrics_file_starts_one(tmp_path):
    """Resuming into a run directory without metrics.jsonl creates it."""
    tracker = _tracker(tmp_path, start_step=4)
    tracker.log(5, {"a": 1.0})
    tracker.close()
    assert _read_steps(tmp_path / "metrics.jsonl") == [5]


def test_tracker_resume_tolerates_a_torn_last_line(tmp_path):
    """A crash while writing a row leaves a partial last line; resuming drops it and keeps the complete rows."""
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, [1, 2, 3])
    with open(path, "a") as f:
        f.write('{"step": 4, "time": 0.0, "reward/rew')  # torn write
    tracker = _tracker(tmp_path, start_step=3)
    tracker.close()
    assert _read_steps(path) == [1, 2, 3]
