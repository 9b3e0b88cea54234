"""`saferl reward` through TRL's RewardTrainer on the toy RM: a few steps on hand-made pairs raise the
chosen-minus-rejected margin, and the saved model scores through `HelpfulnessScorer`.

The pairs teach the toy RM a preference it does not hold: for 16 cooking questions, the refusal is preferred
to the helpful answer (the toy RM scores helpful +3, refusal -1). 8 steps of 8 pairs, full fine-tuning (OUT
is the classifier) and LoRA rank 8 with `--merge` (OUT/merged is). The scorer, loading the result as
`helpfulness.model` would, must rank every pair's refusal first, where the toy RM ranks it last on average.
~30 s a variant on 2 busy cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _pairs():
    from saferl.toyworld import world

    cooking = [p for p in world.make_prompts("train") if p.meta["group"] == "cooking"][::12][:16]
    rows = []
    for i, p in enumerate(cooking):
        answers = world.responses_for(p)
        refusal, helpful = answers["refusal"][0], answers["helpful"][0]
        if i % 2:  # TRL's explicit-prompt form on every other row
            rows.append({"prompt": p.messages, "chosen": [{"role": "assistant", "content": refusal}],
                         "rejected": [{"role": "assistant", "content": helpful}]})
        else:
            rows.append({"chosen": p.messages + [{"role": "assistant", "content": refusal}],
                         "rejected": p.messages + [{"role": "assistant", "content": helpful}]})
    return [(p.messages, answers) for p in cooking for answers in [world.responses_for(p)]], rows


def _margins(model_dir, prompts):
    from saferl.helpfulness import HelpfulnessScorer

    scorer = HelpfulnessScorer(str(model_dir))
    chosen = scorer.score([(m, a["refusal"][0]) for m, a in prompts])
    rejected = scorer.score([(m, a["helpful"][0]) for m, a in prompts])
    return [c - r for c, r in zip(chosen, rejected)]


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_reward_trainer_raises_the_margin_and_the_result_scores(toy_world, tmp_path, variant):
    prompts, rows = _pairs()
    data, out = tmp_path / "prefs.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = ["--lora-rank", "8", "--merge", "--lr", "5e-3"] if variant == "lora" else ["--lr", "1e-3"]
    command = [sys.executable, "-m", "saferl.cli", "reward", "--model", "toyworld:reward_model",
               "--data", str(data), "--out", str(out), "--steps", "8", "--batch-size", "8", *lora,
               "logging_steps=1"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    log = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "margin" in e]
    assert len(log) == 8
    assert log[0]["margin"] < 0 < 2 < log[-1]["margin"], [e["margin"] for e in log]  # ~-0.9 -> ~4-6
    assert log[-1]["accuracy"] == 1.0

    before = _margins(toy_world.part("reward_model"), prompts)
    trained = out / "merged" if variant == "lora" else out
    if variant == "lora":
        assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
        assert not (out / "model.safetensors").exists()  # the adapter (and score head) alone at the top
    after = _margins(trained, prompts)
    assert sum(before) / len(before) < 0, before  # the toy RM prefers the helpful answer (~-0.4)
    assert min(after) > 1.0, after  # every pair now ranks the refusal first, by a clear margin (~4-6)
