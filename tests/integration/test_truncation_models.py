"""Over-long inputs on the toy RM and guard (HF backends): the RM scores the answer's end it keeps, the guard
reads its whole instruction, and a context shorter than a scorer's template is refused when it is built."""

import random

import pytest

from saferl.data import load_prompts
from saferl.toyworld import world


@pytest.fixture(scope="module")
def prompts(toy_world):
    return load_prompts(toy_world.part("heldout"))


def test_rm_scores_the_answer_end_it_keeps(toy_world, prompts):
    """Two answers that share a long start and end differently: cut to 64 tokens, they score differently
    (cutting the ids to their first 64 kept the same start for both, so both got the same score)."""
    from saferl.helpfulness import HelpfulnessScorer

    prompt = prompts[0]
    filler = world.off_topic_response(prompt, random.Random(0))
    answers = {style: f"{filler} {filler} {texts[0]}" for style, texts in world.responses_for(prompt).items()}
    rm = HelpfulnessScorer(str(toy_world.part("reward_model")), backend="hf", max_length=64)
    helpful, refusal = rm.score([(prompt.messages, answers["helpful"]), (prompt.messages, answers["refusal"])])
    assert abs(helpful - refusal) > 0.05 and rm.stats() == {"truncated": 2}
    rm.score([(prompt.messages, "Sure.")])
    assert rm.stats() == {"truncated": 2}  # a pair that fits is not counted
    with pytest.raises(ValueError, match=r"helpfulness.max_length \(--max-model-len\) 8 is shorter"):
        HelpfulnessScorer(str(toy_world.part("reward_model")), backend="hf", max_length=8)


def test_guard_reads_its_whole_instruction_when_the_conversation_is_cut(toy_world, prompts):
    """Five earlier turns push a response past the guard's context. Cut oldest first, the guard's input keeps
    the whole moderation instruction at its start and the response and generation prompt at its end (when the
    rendered ids were cut from the left, the instruction's start went and build 4's guard read both answers
    as 'Refusal: No'; build 5's guard reads multi-turn cut conversations as 'Refusal: No' either way, so the
    input itself is checked)."""
    from saferl.guard.scorer import GuardScorer, ModerationItem, moderation_ids

    history = [m for p in prompts[1:6] for m in
               (p.messages[-1], {"role": "assistant", "content": next(iter(world.responses_for(p).values()))[0]})]
    prompt = prompts[0]
    responses = world.responses_for(prompt)
    items = [ModerationItem(history + prompt.messages, responses[style][0]) for style in ("helpful", "refusal")]
    guard = GuardScorer(str(toy_world.part("guard")), backend="hf", max_model_len=420)  # 314 instruction tokens
    verdicts = guard.moderate(items)
    assert guard.stats() == {"truncated": 2}
    assert all(v.parse_ok for v in verdicts)
    tok = guard.tokenizer
    single = moderation_ids(tok, ModerationItem(prompt.messages, responses["refusal"][0]), 10_000)[0]
    full = moderation_ids(tok, items[1], 10_000)[0]
    cut, was_cut = moderation_ids(tok, items[1], 420 - 32)
    assert was_cut and len(cut) <= 420 - 32 < len(full)
    assert cut[:200] == single[:200]  # the instruction before the conversation, as in an uncut single turn
    assert cut[-40:] == full[-40:]  # the response, the instruction's end and the generation prompt
    with pytest.raises(ValueError, match=r"guard.max_model_len \(--max-model-len\) 300 leaves 268 prompt "
                                         r"tokens after max_new_tokens=32, fewer than the \d+ tokens"):
        GuardScorer(str(toy_world.part("guard")), backend="hf", max_model_len=300)
