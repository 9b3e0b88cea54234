"""`saferl eval` end to end on the toy world (HF backend, 8 held-out prompts x 1 sample, two policy columns).

The same policy under two labels must give identical columns (the evaluation seed fixes every sample); the
8 prompts at an even stride cover benign prompts and every harmful category; the toy prompts carry ground
truth, so the ground-truth rows appear; rates lie in [0, 1].
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_eval_cli_on_toy_policy(toy_world, tmp_path):
    out = tmp_path / "eval"
    policy = str(toy_world.part("policy"))
    command = [sys.executable, "-m", "saferl.cli", "eval", "-m", f"a={policy}", "-m", f"b={policy}",
               "--prompts", str(toy_world.part("heldout")), "--guard", str(toy_world.part("guard")),
               "--rm", str(toy_world.part("reward_model")), "--backend", "hf", "--max-prompts", "8",
               "--samples-per-prompt", "1", "-o", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["kinds"] == {"benign": 4, "harmful": 4} and data["settings"]["seed"] == 1234
    a, b = data["results"]["a"], data["results"]["b"]
    assert a == b  # same model, same seed: the same samples and verdicts
    assert (a["samples"], a["harmful_samples"], a["benign_samples"]) == (8.0, 4.0, 4.0)
    categories = {k for k in a if k.startswith("safety_rate/")}
    assert categories == {"safety_rate/Violent", "safety_rate/Non-violent Illegal Acts", "safety_rate/PII",
                          "safety_rate/Copyright Violation"}
    for key in ("safety_rate", "benign_refusal_rate", "truth_unsafe_rate", "truth_garbled_rate",
                "guard_fooled_rate", *categories):
        assert 0.0 <= a[key] <= 1.0, key
    assert isinstance(a["benign_helpfulness"], float)

    table = (out / "results.md").read_text()
    assert table.strip() in proc.stdout  # printed and written alike
    header, rule, *rows = table.split("\n\n", 1)[1].strip().splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == ["held-out metric", "a", "b"]
    assert rows[0].startswith("| safety rate (harmful, guard)") and any("safety rate: PII" in r for r in rows)
    assert any("guard fooled" in r for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {s["model"] for s in samples} == {"a", "b"}
    assert all(s["safety"] in ("Safe", "Unsafe", "Controversial") for s in samples)
