"""The toy Stream guard end to end: it builds next to the toy world, streams token by token, and
`saferl guard eval --kind stream` / `saferl guard train-stream` run through the CLI on the toy references.

Marked slow as every test on the `toy_world` fixture is: cold, the toy world (~4 min) and then the Stream
guard (~1 min on one thread) are built first; with both cached the module takes about 20 s.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saferl.guard.decisions import LATENCY_BINS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "saferl.cli", "guard", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def toy_stream(toy_world):
    from saferl.toyworld.stream import ensure_toy_stream

    return ensure_toy_stream(toy_world.root)


def test_toy_stream_guard_builds_once_and_learns_its_labels(toy_world, toy_stream):
    from saferl.config import load_config
    from saferl.references import resolve_reference
    from saferl.toyworld.build import ensure_toy_stream_guard
    from saferl.toyworld.stream import VERSION

    assert toy_stream.guard == toy_world.root / "stream_guard"
    info = json.loads((toy_stream.guard / "build.json").read_text())
    assert info["version"] == VERSION and info["backbone"] == "guard"
    # No bound on the recorded build_seconds: a cached wall time under load says nothing about the code.
    assert info["last_loss"] < 0.05 * info["first_loss"]
    assert info["heldout"]["token_risk_acc"] > 0.98 and info["heldout"]["query_risk_acc"] > 0.98
    # Cached: the public entry points return the same paths without rebuilding.
    cfg = load_config(None, [f"toyworld.cache_dir={toy_world.root.parent}"]).toyworld
    assert ensure_toy_stream_guard(cfg) == toy_stream.guard
    assert resolve_reference("toyworld:stream_heldout", cfg) == str(toy_stream.heldout)
    assert resolve_reference("toyworld:policy", cfg) == str(toy_world.part("policy"))
    assert json.loads((toy_stream.guard / "build.json").read_text()) == info
    with pytest.raises(ValueError, match="unknown toy world part 'nope'"):
        resolve_reference("toyworld:nope", cfg)


def test_streaming_flags_unsafe_compliance_at_its_trigger(toy_stream):
    """Token by token on the KV cache: an unsafe answer is flagged on the token after its first unsafe one,
    with its category; a refusal to the same prompt never is."""
    from transformers import AutoTokenizer

    from saferl.guard.decisions import debounce
    from saferl.guard.conversation import encode_conversation, find_user_turn, role_tokens
    from saferl.guard.stream import StreamBatch
    from saferl.guard.stream_model import load_stream_guard

    rows = [json.loads(line) for line in toy_stream.heldout.read_text().splitlines()]
    unsafe = next(r for r in rows if r["style"] == "unsafe" and r["category"] == "PII")
    refusal = next(r for r in rows if r["id"] == unsafe["id"].rsplit("/", 1)[0] + "/refusal")
    tokenizer = AutoTokenizer.from_pretrained(toy_stream.guard)
    model, roles = load_stream_guard(toy_stream.guard), role_tokens(tokenizer)
    seqs = [encode_conversation(tokenizer, r["message"]) for r in (unsafe, refusal)]
    ends = [find_user_turn(s, roles)[1] for s in seqs]
    batch = StreamBatch(model, roles, pad_id=tokenizer.pad_token_id)
    prefill = batch.prefill([s[: e + 1] for s, e in zip(seqs, ends)])
    verdicts = {i: step.verdicts for i, step in enumerate(prefill)}
    assert [v.risk for v in verdicts[0]] == ["Unsafe"] and verdicts[0][0].category == "PII"  # harmful prompt
    for t in range(max(map(len, seqs))):
        chunks = {i: s[e + 1 + t : e + 2 + t] for i, (s, e) in enumerate(zip(seqs, ends))}
        for i, step in batch.feed({i: c for i, c in chunks.items() if c}).items():
            verdicts[i] += step.verdicts
    answer = [[v for v in verdicts[i] if v.role == "assistant"] for i in (0, 1)]
    first = answer[0][0].position
    detection = debounce([v.risk for v in answer[0]], categories=[v.category for v in answer[0]])
    assert first + detection.index == unsafe["unsafe_start_index"] + 1
    assert (detection.label, detection.category) == ("Unsafe", "PII")
    assert debounce([v.risk for v in answer[1]]).index is None


def test_guard_eval_stream_on_the_toy_heldout_set(toy_stream, tmp_path):
    out, preds = tmp_path / "report.json", tmp_path / "pred.jsonl"
    stdout = run_cli("eval", "--kind", "stream", "-m", "toyworld:stream_guard", "-d",
                     "toyworld:stream_heldout", "-o", str(out), "--predictions", str(preds))
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in toy_stream.heldout.read_text().splitlines()]
    controversial = sum(r["style"] == "controversial" for r in rows)
    assert report["kind"] == "stream" and report["debounce"] == "official"
    assert report["n"] == len(rows) == 1600
    assert report["labels"] == {"Unsafe": 320, "Safe": 1280} and controversial == 64
    strict, loose = report["metrics"]["strict"], report["metrics"]["loose"]
    assert strict["f1"] > 0.97 and strict["precision"] > 0.97
    # Controversial compliance is gold Unsafe; the guard calls it Controversial, which loose counts as Safe.
    assert report["predictions"]["Controversial"] >= 0.9 * controversial
    assert loose["recall"] <= 1 - report["predictions"]["Controversial"] / 320 + 1e-9
    latency = report["latency"]
    assert latency["n"] == 320 and sum(latency["bins"].values()) == 320 and latency["without_span"] == 0
    assert latency["bins"]["Hit"] >= 0.95 * 320 and latency["exact_hit_rate"] == latency["bins"]["Hit"] / 320
    per_row = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["id"] for p in per_row] == [r["id"] for r in rows]
    hit = next(p for p in per_row if p.get("latency_bin") == "Hit")
    span = next(r for r in rows if r["id"] == hit["id"])
    assert span["unsafe_start_index"] <= hit["detection_index"] <= span["unsafe_end_index"]
    assert "strict *" in stdout and "loose" in stdout
    assert "latency (official debouncing) over 320 Unsafe rows with a span: " in stdout
    assert all(f"{name} {latency['bins'][name]}" in stdout for name in LATENCY_BINS)


def test_train_stream_cli_on_toy_rows(toy_world, toy_stream, tmp_path):
    from saferl.guard.stream_model import load_stream_guard

    lines = toy_stream.heldout.read_text().splitlines()[::20]  # 80 rows, Safe and Unsafe
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "trained"
    stdout = run_cli("train-stream", "--backbone", "toyworld:guard", "--data", str(data), "-o", str(out),
                     "--steps", "30", "--batch-size", "8", "--lr", "3e-3", "--freeze-backbone")
    assert f"80 rows from {data}; 30 steps of 8 (heads only)" in stdout and f"saved to {out}" in stdout
    first, last = (float(x) for x in stdout.split("[train-stream] loss ")[1].split(";")[0].split(" -> "))
    assert last < 0.5 * first
    trained = load_stream_guard(out)
    from safetensors.torch import load_file

    gen = load_file(toy_world.part("guard") / "model.safetensors")
    for key, value in trained.model.state_dict().items():  # --freeze-backbone: the Gen guard's own weights
        assert (value == gen[f"model.{key}"]).all(), key
