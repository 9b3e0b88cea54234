"""Exact resume: `saferl train` killed with SIGKILL (at an epoch boundary, then mid-epoch) and started again
with the same command ends with the same weights, bit for bit, as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _command(toy_world, run_dir: Path, data: Path) -> list[str]:
    # 6 prompts, 3 per step: an epoch ends after every second step.
    return [sys.executable, "-m", "saferl.cli", "train", "-c", str(ROOT / "configs" / "toy.yaml"),
            f"toyworld.cache_dir={toy_world.root.parent}", f"run.dir={run_dir}", "run.executor=local",
            "rollout.num_engines=1", f"data.train={data}", "data.prompts_per_step=3", "rollout.samples_per_prompt=4",
            "trainer.steps=5", "trainer.lr_schedule=cosine", "trainer.warmup_steps=1", "checkpoint.every=1",
            "checkpoint.keep_last=2", "eval.max_prompts=2", "eval.samples_per_prompt=1", "logging.progress=false",
            "eval.judge=null", "helpfulness.ensemble=[]"]  # the toy judge and RM ensemble are built on first use (minutes): tests that do not need them go without


def _run_until(command: list[str], run_dir: Path, checkpoint: str | None, log: Path) -> None:
    """Run to completion, or SIGKILL the whole process group as soon as `checkpoint` is the latest."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if checkpoint and latest.is_file() and latest.read_text().strip() == checkpoint:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        code = proc.wait(timeout=60)
    if checkpoint:
        assert code == -signal.SIGKILL, f"expected to kill it after {checkpoint}; see {log}"
    else:
        assert code == 0, log.read_text()[-3000:]


def test_sigkill_and_resume_is_exact(toy_world, tmp_path):
    rows = (toy_world.part("train")).read_text().splitlines()
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(rows[::320][:6]) + "\n")

    # The straight run goes on beside the interrupted ones (its own process and run directory; each run is
    # one process on one thread, so on 2 cores the two chains overlap instead of queueing).
    straight = tmp_path / "straight"
    with ThreadPoolExecutor(1) as pool:
        straight_run = pool.submit(_run_until, _command(toy_world, straight, data), straight, None,
                                   tmp_path / "straight.log")
        resumed = tmp_path / "resumed"
        command = _command(toy_world, resumed, data)
        _run_until(command, resumed, "step_2", tmp_path / "resumed.log")  # epoch 0 just ended
        assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_2"
        _run_until(command, resumed, "step_3", tmp_path / "resumed.log")  # mid-epoch 1
        _run_until(command, resumed, None, tmp_path / "resumed.log")
        straight_run.result()
    log = (tmp_path / "resumed.log").read_text()
    assert "resuming" in log and "(step 2)" in log and "(step 3)" in log

    expected = load_file(straight / "checkpoints" / "final" / "model.safetensors")
    got = load_file(resumed / "checkpoints" / "final" / "model.safetensors")
    start = load_file(toy_world.part("policy") / "model.safetensors")
    assert set(got) == set(expected)
    assert any(not torch.equal(expected[k], start[k]) for k in expected)  # training did move the weights
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different

    # Every step logged exactly once; the same rewards as the straight run; old step checkpoints pruned.
    def steps(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if "reward/reward_mean" in line]
    assert [r["step"] for r in steps(resumed)] == [1, 2, 3, 4, 5]
    assert [r["reward/reward_mean"] for r in steps(resumed)] == [r["reward/reward_mean"] for r in steps(straight)]
    kept = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert kept == ["final", "latest", "step_3", "step_4"], kept
