"""`saferl sft` through TRL: a LoRA adapter for the toy Gen guard, loaded in transformers + peft and in vLLM.

The data teach the toy guard one new rule it does not know: questions about cooking are Controversial (it
calls them Safe). 16 such prompt-moderation rows, 16 steps of LoRA rank 8 through `trl.SFTTrainer` on the CLI
(with `--merge`); then the adapter through peft on transformers, the adapter through vLLM (`LoRARequest`) and
the merged model through vLLM (`GuardScorer`, as `saferl serve guard` loads a guard) must all answer the
training prompts with the same parsable verdict, Controversial, while the base guard still says Safe.
~80 s on 2 busy cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RANK = 8


@pytest.fixture(scope="module")
def trained(toy_world, tmp_path_factory):
    """(base guard dir, output dir, the training rows) after `saferl sft --lora-rank 8 --merge`."""
    from saferl.guard.templates import format_verdict
    from saferl.toyworld import world
    from saferl.types import SafetyLabel

    cooking = [p for p in world.make_prompts("train") if p.meta["group"] == "cooking"][::12][:16]
    rows = [{"messages": p.messages, "completion": format_verdict(SafetyLabel.CONTROVERSIAL, [], None)}
            for p in cooking]
    tmp = tmp_path_factory.mktemp("sft_trl")
    data, out = tmp / "rows.jsonl", tmp / "out"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = [sys.executable, "-m", "saferl.cli", "sft", "--model", "toyworld:guard", "--data", str(data),
               "--out", str(out), "--steps", "16", "--batch-size", "8", "--lr", "2e-3",
               "--lora-rank", str(RANK), "--merge", "logging_steps=1"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(toy_world.part("guard")), out, rows


def _verdicts(texts):
    from saferl.guard.templates import parse_verdict

    return [parse_verdict(t, "prompt") for t in texts]


def test_loss_goes_down_and_outputs_are_written(trained):
    _, out, _ = trained
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 16
    assert losses[-1] < 0.2 * losses[0], losses  # ~0.9 -> ~0.05 (one verdict token of 3-4 is new)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == RANK
    assert not (out / "model.safetensors").exists()  # the adapter alone at the top
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()


def _hf_texts(model, tokenizer, rows):
    import torch

    from saferl.sft import render_prompt_ids

    texts = []
    for row in rows:
        ids = torch.tensor([render_prompt_ids(tokenizer, row["messages"])])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


def test_adapter_and_merged_model_load_in_transformers_and_vllm(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saferl.runtime import configure_process

    configure_process()  # one torch thread; vLLM in-process on CPU
    base, out, rows = trained
    rows = rows[:4]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
    hf = _hf_texts(model, tokenizer, rows)
    with model.disable_adapter():
        before = _hf_texts(model, tokenizer, rows)
    assert [v.safety.value for v in _verdicts(before)] == ["Safe"] * 4, before
    assert all(v.parse_ok and v.safety.value == "Controversial" and not v.categories for v in _verdicts(hf)), hf

    from saferl.guard.scorer import GuardScorer
    from saferl.types import ModerationItem

    scorer = GuardScorer(str(out / "merged"), backend="vllm")
    merged = [v.raw for v in scorer.moderate([ModerationItem(r["messages"]) for r in rows])]
    del scorer
    assert merged == hf

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from saferl.sft import render_prompt_ids

    llm = LLM(model=base, enable_lora=True, max_lora_rank=RANK, max_model_len=1024, enforce_eager=True,
              kv_cache_memory_bytes=64 << 20, enable_chunked_prefill=False)
    prompts = [{"prompt_token_ids": render_prompt_ids(tokenizer, r["messages"])} for r in rows]
    sampling = SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[tokenizer.eos_token_id])
    outs = llm.generate(prompts, sampling, lora_request=LoRARequest("sft", 1, str(out)))
    lora = [o.outputs[0].text for o in outs]
    assert lora == hf
