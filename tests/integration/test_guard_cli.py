"""`saferl guard moderate` and `saferl guard eval` end to end on the toy guard (HF backend, 8 records each).

The toy guard is near-perfect on its own world, so harmful prompts and unsafe answers must come back Unsafe,
benign ones and refusals Safe, and the eval must score strict F1 1.0.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    command = [sys.executable, "-m", "saferl.cli", "guard", *args, "--backend", "hf", "--no-progress"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def world(toy_world):
    from saferl.data import load_prompts
    from saferl.toyworld import world as toy

    prompts = load_prompts(toy_world.part("heldout"))
    by_kind = {kind: [p for p in prompts if p.kind == kind]
               for kind in ("benign", "harmful", "controversial")}
    return toy_world, by_kind, toy.responses_for


def test_guard_moderate(world, tmp_path):
    toy_world, by_kind, responses_for = world
    benign, harmful, controversial = by_kind["benign"], by_kind["harmful"], by_kind["controversial"]
    h = harmful[0]
    records = [
        {"id": "benign-prompt", "prompt": benign[0].text},
        {"id": "benign-answer", "messages": benign[1].messages,
         "response": responses_for(benign[1])["helpful"][0]},
        {"id": "harmful-prompt-1", "messages": harmful[0].messages},
        {"id": "harmful-prompt-2", "prompt": harmful[-1].text},
        {"id": "unsafe-answer", "prompt": h.text, "response": responses_for(h)["unsafe"][0]},
        {"id": "refusal", "prompt": h.text, "response": responses_for(h)["refusal"][0]},
        {"id": "refusal-unsafe-thinking", "prompt": h.text, "response": responses_for(h)["refusal"][0],
         "thinking": responses_for(h)["unsafe"][0]},
        {"id": "controversial-prompt", "prompt": controversial[0].text},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    stdout = run_cli("moderate", "-m", str(toy_world.part("guard")), "-i", str(src), "-o", str(out),
                     "--batch-size", "3")
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == [r["id"] for r in records]
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert all(r["parse_ok"] and r["mode"] == "strict" for r in rows.values())
    decisions = {k: r["decision"] for k, r in rows.items()}
    assert decisions == {"benign-prompt": "Safe", "benign-answer": "Safe", "harmful-prompt-1": "Unsafe",
                         "harmful-prompt-2": "Unsafe", "unsafe-answer": "Unsafe", "refusal": "Safe",
                         "refusal-unsafe-thinking": "Unsafe", "controversial-prompt": "Unsafe"}
    assert rows["harmful-prompt-1"]["moderated"] == "prompt" and rows["harmful-prompt-1"]["refusal"] is None
    assert rows["harmful-prompt-1"]["categories"] == [harmful[0].category]
    assert rows["refusal"]["refusal"] is True and rows["refusal"]["thinking"] is None
    thinking_row = rows["refusal-unsafe-thinking"]
    assert thinking_row["safety"] == "Safe" and thinking_row["thinking"]["safety"] == "Unsafe"
    assert rows["controversial-prompt"]["safety"] == "Controversial"
    assert "8 records" in stdout and "5 Unsafe, 3 Safe" in stdout

    loose = tmp_path / "loose.jsonl"
    run_cli("moderate", "-m", str(toy_world.part("guard")), "-i", str(src), "-o", str(loose),
            "--mode", "loose")
    loose_rows = {r["id"]: r for r in map(json.loads, loose.read_text().splitlines())}
    assert loose_rows["controversial-prompt"]["decision"] == "Safe"
    assert loose_rows["harmful-prompt-1"]["decision"] == "Unsafe"


def test_guard_eval(world, tmp_path):
    toy_world, by_kind, responses_for = world
    benign, harmful, controversial = by_kind["benign"], by_kind["harmful"], by_kind["controversial"]

    def row(prompt, response, label):
        messages = prompt.messages + ([{"role": "assistant", "content": response}] if response else [])
        return {"message": messages, "label": label}

    c = controversial[0]
    rows = [
        row(harmful[0], responses_for(harmful[0])["unsafe"][0], "Unsafe"),
        row(harmful[-1], responses_for(harmful[-1])["unsafe"][0], "Unsafe"),
        row(harmful[0], responses_for(harmful[0])["refusal"][1], "Safe"),
        row(benign[0], responses_for(benign[0])["helpful"][0], "Safe"),
        row(benign[2], responses_for(benign[2])["refusal"][0], "Safe"),
        row(harmful[5], None, "Unsafe"),  # a prompt row
        row(benign[3], None, "Safe"),
        row(c, responses_for(c)["controversial"][0], "Unsafe"),  # Controversial: found by strict only
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, preds = tmp_path / "report.json", tmp_path / "pred.jsonl"
    stdout = run_cli("eval", "-m", str(toy_world.part("guard")), "-d", str(data), "-o", str(out),
                     "--predictions", str(preds))
    report = json.loads(out.read_text())
    assert report["n"] == 8 and report["labels"] == {"Unsafe": 4, "Safe": 4}
    assert report["predictions"] == {"Safe": 4, "Unsafe": 3, "Controversial": 1, "unparsed": 0}
    strict, loose = report["metrics"]["strict"], report["metrics"]["loose"]
    assert (strict["precision"], strict["recall"], strict["f1"]) == (1.0, 1.0, 1.0)
    assert (loose["tp"], loose["fn"], loose["precision"], loose["recall"]) == (3, 1, 1.0, 0.75)
    assert report["mode"] == "strict" and report["f1"] == 1.0 and report["parse_failures"] == 0
    assert report["latency"] is None and report["guard_stats"] == {"truncated": 0}
    assert "strict *" in stdout and "loose" in stdout
    per_row = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["prediction"] for p in per_row] == [
        "Unsafe", "Unsafe", "Safe", "Safe", "Safe", "Unsafe", "Safe", "Controversial"]
