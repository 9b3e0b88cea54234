"""The built toy world: acceptance metrics, cache reuse, plain HF loading, the guard's exact output format."""

import re
import time

import pytest

from saferl.config import load_config
from saferl.toyworld.build import ensure_built, world_key
from saferl.toyworld.evaluate import TARGETS

pytestmark = pytest.mark.slow

CATS = "Violent|Non-violent Illegal Acts|PII|Copyright Violation|Unethical Acts"
PROMPT_FORMAT = re.compile(rf"Safety: (Safe|Unsafe|Controversial)\nCategories: (None|{CATS})")
RESPONSE_FORMAT = re.compile(rf"Safety: (Safe|Unsafe|Controversial)\nCategories: (None|{CATS})\nRefusal: (Yes|No)")


def test_built_world_meets_its_targets(toy_world_build):
    """Measured on the models on disk with this code: by the build itself when this session built the world
    (a clean clone, as in CI: the build measured these files minutes ago, the guard on every second held-out
    prompt, the RM and the policy, 2 samples, on all 640), else measured now (a cached world's metrics.json was
    written by an earlier build, perhaps with older code): the guard on every fourth held-out prompt (720
    verdicts: 560 on clean text, 160 on corrupted answers), the RM and the policy (2 samples) on all 640."""
    from saferl.data import load_prompts
    from saferl.toyworld.evaluate import evaluate_guard, evaluate_policy, evaluate_reward_models, missed_targets

    toy_world, metrics = toy_world_build
    if metrics is None or metrics.get("guard_items", 0) < 720:  # (a build that measured fewer: measure here)
        prompts = load_prompts(toy_world.part("heldout"))
        metrics = {**evaluate_guard(str(toy_world.part("guard")), prompts[::4]),
                   **evaluate_reward_models({"reward_model": str(toy_world.part("reward_model"))}, prompts),
                   **evaluate_policy(str(toy_world.part("policy")), prompts, seed=0)}
        assert metrics["guard_items"] == 720
    assert set(TARGETS) <= set(metrics)
    assert missed_targets(metrics) == [], metrics


def test_second_build_reuses_the_cache(toy_world):
    cfg = load_config(None, [f"toyworld.cache_dir={toy_world.root.parent}"]).toyworld
    start = time.monotonic()
    assert ensure_built(cfg).root == toy_world.root
    assert time.monotonic() - start < 5


def test_changed_config_changes_the_cache_key():
    a = load_config(None).toyworld
    b = load_config(None, ["toyworld.guard_sft.steps=30"]).toyworld
    c = load_config(None, ["toyworld.cache_dir=/elsewhere"]).toyworld
    assert world_key(a) != world_key(b)
    assert world_key(a) == world_key(c)


def test_models_load_with_plain_from_pretrained(toy_world):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for part in ("policy", "guard"):
        model = AutoModelForCausalLM.from_pretrained(toy_world.part(part))
        assert type(model).__name__ == "Qwen3ForCausalLM"
    rm = AutoModelForSequenceClassification.from_pretrained(toy_world.part("reward_model"))
    assert type(rm).__name__ == "Qwen3ForSequenceClassification" and rm.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(toy_world.part("policy"))
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


def test_guard_emits_exact_gen_format(toy_world):
    """Messages in, text out, exactly as Qwen3Guard-Gen is called; the raw text is the Gen format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saferl.data import load_prompts
    from saferl.toyworld import world

    tok = AutoTokenizer.from_pretrained(toy_world.part("guard"))
    model = AutoModelForCausalLM.from_pretrained(toy_world.part("guard"))
    for p in load_prompts(toy_world.part("heldout"))[::97]:
        for response in (None, world.responses_for(p)["refusal"][0]):
            messages = p.messages + ([{"role": "assistant", "content": response}] if response else [])
            ids = tok.apply_chat_template(messages, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=32, do_sample=False)
            text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            fmt = RESPONSE_FORMAT if response else PROMPT_FORMAT
            assert fmt.fullmatch(text), repr(text)
