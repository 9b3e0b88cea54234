"""Bad input, endpoints and cluster: `saferl train` with remote scorers or a Ray address that nothing answers
exits non-zero before step 1, prints one line naming the URL or address, and no traceback."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here any more
    return f"http://127.0.0.1:{port}"


def _train(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI on the toy config, with the run under tmp_path; (result, seconds)."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "saferl.cli", "train", "-c", "configs/toy.yaml",
                          f"run.dir={tmp_path / 'run'}", *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return out, time.monotonic() - start


def _assert_refused(out: subprocess.CompletedProcess, tmp_path: Path, *named: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert all(n in out.stderr for n in named), out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was logged


def test_http_guard_nothing_answers(tmp_path):
    """The issue's case: guard.backend=http guard.urls=[http://127.0.0.1:9]."""
    out, _ = _train(tmp_path, "guard.backend=http", "guard.urls=[http://127.0.0.1:9]")
    _assert_refused(out, tmp_path, "http://127.0.0.1:9", "guard.urls")
    assert not (tmp_path / "run").exists()  # stopped before the run directory, the toy world or Ray


def test_openai_guard_nothing_answers(tmp_path):
    dead = _dead_url()
    out, _ = _train(tmp_path, "guard.backend=openai", f"guard.urls=[{dead}]")
    _assert_refused(out, tmp_path, dead, "guard.urls")


def test_http_reward_model_nothing_answers(tmp_path):
    dead = _dead_url()
    out, _ = _train(tmp_path, "helpfulness.backend=http", f"helpfulness.urls=[{dead}]", "helpfulness.ensemble=[]")
    _assert_refused(out, tmp_path, dead, "helpfulness.urls")


def test_ray_address_nothing_answers_fails_within_30s(tmp_path):
    """Today ray.init retries such an address for minutes. An empty toy-world cache: the address must be
    refused before the toy world would be built (a clean clone's first test run has none yet)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(4)))
    out, seconds = _train(tmp_path, "ray.address=127.0.0.1:9", f"data.train={prompts}",
                          f"eval.prompts={prompts}", f"toyworld.cache_dir={tmp_path / 'no-toy-world'}")
    _assert_refused(out, tmp_path, "ray.address=127.0.0.1:9")
    assert seconds < 30, f"took {seconds:.1f}s"
