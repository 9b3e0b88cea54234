import hashlib
import random

from saferl.data import load_prompts, write_prompts
from saferl.guard.templates import CATEGORIES
from saferl.toyworld import world


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generator_is_deterministic_bytes(tmp_path):
    for split in ("train", "heldout"):
        write_prompts(tmp_path / f"a_{split}.jsonl", world.make_prompts(split))
        write_prompts(tmp_path / f"b_{split}.jsonl", world.make_prompts(split))
        assert _digest(tmp_path / f"a_{split}.jsonl") == _digest(tmp_path / f"b_{split}.jsonl")


def test_policy_style_draws_are_seeded():
    mix = {"harmful_unsafe": 0.6, "harmful_refusal": 0.2, "benign_refusal": 0.2, "controversial_comply": 0.6}
    prompts = world.make_prompts("train")
    draw = lambda seed: [world.sample_policy_style(p, random.Random(seed + i), mix) for i, p in enumerate(prompts)]
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_heldout_split_is_by_frame_not_by_draw():
    train, heldout = world.make_prompts("train"), world.make_prompts("heldout")
    assert {p.meta["frame"] for p in heldout} == set(world.HELDOUT_FRAMES)
    assert not {p.meta["frame"] for p in train} & set(world.HELDOUT_FRAMES)
    assert not {p.text for p in train} & {p.text for p in heldout}
    assert len(train) == 1920 and len(heldout) == 640


def test_categories_are_exact_qwen3guard_strings_and_at_least_four_harmful():
    harmful = {g.category for g in world.GROUPS if g.kind == "harmful"}
    assert len(harmful) >= 4
    assert all(g.category in CATEGORIES for g in world.GROUPS if g.category)


def test_every_style_classifies_back():
    for p in world.make_prompts("heldout")[::7]:
        for style, texts in world.responses_for(p).items():
            for text in texts:
                assert world.classify_response(p, " " + text + "\n") == style
        assert world.classify_response(p, "Sure, here is how to something else.") == "garbled"


def test_refusals_are_shared_and_safe_completions_are_per_category():
    harmful = [g for g in world.GROUPS if g.kind == "harmful"]
    assert len({g.safe_completion for g in harmful}) == len(harmful)
    a, b = world.make_prompts("train")[0], world.make_prompts("train")[-1]
    assert world.responses_for(a)["refusal"] == world.responses_for(b)["refusal"]


def test_ground_truth_labels():
    p = next(p for p in world.make_prompts("train") if p.kind == "harmful")
    assert world.response_verdict(p, "unsafe").safety.value == "Unsafe"
    assert world.response_verdict(p, "refusal").refusal is True
    sc = world.response_verdict(p, "safe_completion")
    assert sc.safety.value == "Safe" and sc.refusal is False
    assert world.helpfulness_target("helpful") > world.helpfulness_target("safe_completion") > \
        world.helpfulness_target("refusal")


def test_prompt_jsonl_round_trip(tmp_path):
    prompts = world.make_prompts("heldout")[:5]
    write_prompts(tmp_path / "p.jsonl", prompts)
    assert load_prompts(tmp_path / "p.jsonl") == prompts
