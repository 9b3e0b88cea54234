"""The helpfulness RM on vLLM's pooling runner scores exactly as on HF transformers."""

import pytest

pytestmark = pytest.mark.slow


def test_vllm_pooling_rm_matches_hf(toy_world):
    from saferl.data import load_prompts
    from saferl.helpfulness import HelpfulnessScorer
    from saferl.toyworld import world

    prompts = load_prompts(toy_world.part("heldout"))[::40]
    pairs = [(p.messages, texts[0]) for p in prompts for texts in world.responses_for(p).values()]
    pairs.append((prompts[0].messages, "word " * 2000))  # past max_length: truncated alike, not an error
    rm = str(toy_world.part("reward_model"))
    hf = HelpfulnessScorer(rm, backend="hf", batch_size=16).score(pairs)
    vllm = HelpfulnessScorer(rm, backend="vllm").score(pairs)
    assert len(hf) == len(pairs) > 20
    assert max(abs(a - b) for a, b in zip(hf, vllm)) < 1e-4
    assert max(hf) - min(hf) > 1.0  # real, varied scores, not a constant
