"""Bad config values through the real CLI: `saferl train` exits non-zero before anything starts, with one line
naming the key and no traceback (issue 14, point 11)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (override, key the error must name): one or more per class of bad value.
CASES = [
    ("trainer.steps=0", "trainer.steps"),
    ("data.prompts_per_step=0", "data.prompts_per_step"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),  # a group of one: no group advantage
    ("eval.samples_per_prompt=0", "eval.samples_per_prompt"),
    ("rollout.num_engines=0", "rollout.num_engines"),
    ("trainer.workers=0", "trainer.workers"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.lr=-1e-4", "trainer.lr"),
    ("trainer.clip_low=1.5", "trainer.clip_low"),
    ("trainer.clip_high=0", "trainer.clip_high"),
    ("trainer.kl_coef=-0.1", "trainer.kl_coef"),
    ("trainer.entropy_coef=nan", "trainer.entropy_coef"),  # negative is a penalty, not an error
    ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("trainer.minibatches=129", "trainer.minibatches"),  # the toy batch is 16 x 8 = 128
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.warmup_steps=40", "trainer.warmup_steps"),
    ("trainer.max_grad_norm=0", "trainer.max_grad_norm"),
    ("checkpoint.every=-1", "checkpoint.every"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("eval.every=-1", "eval.every"),
    ("guard.timeout_s=0", "guard.timeout_s"),
    ("guard.retries=-1", "guard.retries"),
    ("trainer.cpus=-1", "trainer.cpus"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
    ("guard.backend=http", "guard.urls"),  # a remote guard with no endpoint
]


def _saferl(*args: str, cwd: str = ROOT) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "saferl.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=120)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize("override,key", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_refused(override, key):
    code, output = _saferl("train", "-c", os.path.join(ROOT, "configs", "toy.yaml"), "--dry-run", override)
    assert code != 0, output
    assert "Traceback" not in output
    assert f"'{key}'" in output
    assert len(output.strip().splitlines()) == 1, output


@pytest.mark.parametrize("override,key", [("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
                                          ("rollout.temperature=0", "rollout.temperature"),
                                          ("trainer.minibatches=129", "trainer.minibatches")])
def test_real_train_refuses_before_starting(override, key, tmp_path):
    # Not --dry-run: the training command itself refuses before it makes a run directory or starts an actor.
    run_dir = tmp_path / "run"
    code, output = _saferl("train", "-c", os.path.join(ROOT, "configs", "toy.yaml"), f"run.dir={run_dir}",
                           override)
    assert code != 0 and "Traceback" not in output and f"'{key}'" in output, output
    assert not run_dir.exists()


def test_bad_value_in_a_config_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  steps: 10\n  warmup_steps: 10\n")
    code, output = _saferl("train", "-c", str(config), "--dry-run")
    assert code != 0 and "Traceback" not in output
    assert "'trainer.warmup_steps'" in output and "less than trainer.steps = 10" in output
