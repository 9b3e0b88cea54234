import hashlib
import pytest
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


def test_every_perturbation_is_garbled_and_seeded():
    """Each kind of `world.perturb` is never a clean response of its prompt (the world calls it garbled),
    changes the text, and the same seed gives the same text."""
    import random

    prompts = world.make_prompts("train")[::97]
    pool = [t for p in prompts for texts in world.responses_for(p).values() for t in texts]
    for kind in world.PERTURBATIONS:
        for p in prompts:
            for text in [t for texts in world.responses_for(p).values() for t in texts]:
                out = world.perturb(p, text, kind, random.Random(3), pool)
                assert out != text and world.classify_response(p, out) == "garbled", (kind, text, out)
                assert out == world.perturb(p, text, kind, random.Random(3), pool)


def test_perturbation_kinds_do_what_they_say():
    import random

    p = world.make_prompts("train")[0]
    clean = world.responses_for(p)["helpful"][0]
    rng, pool = random.Random(0), [clean]
    assert len(world.perturb(p, clean, "truncate", rng, pool)) < len(clean)
    assert len(world.perturb(p, clean, "drop", rng, pool).split()) < len(clean.split())
    assert len(world.perturb(p, clean, "repeat", rng, pool).split()) > len(clean.split())
    misspelt = world.perturb(p, clean, "misspell", rng, pool).split()
    assert len(misspelt) == len(clean.split()) and 1 <= sum(a != b for a, b in zip(misspelt, clean.split())) <= 3
    # The right category's text after the wrong prompt: every step is one of the same group's steps.
    group = world.GROUPS_BY_NAME[p.meta["group"]]
    steps = {s for _, st in group.intents for s in st}
    wrong = world.perturb(p, clean, "wrong_prompt", random.Random(5), pool)
    assert any(s in wrong for s in steps)
    with pytest.raises(ValueError, match="unknown perturbation"):
        world.perturb(p, clean, "shuffle", rng, pool)


def test_perturbed_responses_cycle_through_every_kind():
    import random

    p = world.make_prompts("train")[5]
    out = world.perturbed_responses(p, random.Random(0), [world.responses_for(p)["helpful"][0]], 12,
                                    ("helpful", "safe_completion"))
    assert len(out) == 12 and {style for _, style in out} <= {"helpful", "safe_completion"}
    assert all(world.classify_response(p, text) == "garbled" for text, _ in out)
