"""Fitting scorer inputs into their context (saferl.truncation): the cut order on hand-counted sizes, then the
RM's and the guard's real token ids through a tiny tokenizer."""

import pytest

from saferl.guard.scorer import ModerationItem, moderation_ids
from saferl.guard.templates import GUARD_CHAT_TEMPLATE
from saferl.helpfulness import pair_ids
from saferl.truncation import fit_messages, template_size

CONVERSATION = [
    {"role": "system", "content": "SSSS"},
    {"role": "user", "content": "old q"},
    {"role": "assistant", "content": "old a"},
    {"role": "user", "content": "QUESTION"},
    {"role": "assistant", "content": "the END"},
]


def chars_plus_two(messages):
    """A stand-in template: each message costs its characters plus 2 (so CONVERSATION is 29 + 10 = 39)."""
    return sum(len(m["content"]) + 2 for m in messages)


def drop_chars(text, n):
    return text[n:]


def turn(role, content):
    return {"role": role, "content": content}


@pytest.mark.parametrize("budget, expected", [
    (39, CONVERSATION),  # fits as it is
    (30, [turn("assistant", "old a"), turn("user", "QUESTION"), turn("assistant", "the END")]),  # 2 gone
    (19, [turn("user", "QUESTION"), turn("assistant", "the END")]),  # every turn before the last user's gone
    (16, [turn("user", "STION"), turn("assistant", "the END")]),  # then the start of the last user turn
    (9, [turn("user", ""), turn("assistant", "e END")]),  # then the start of the answer: its end stays
])
def test_cut_order_oldest_context_first_answer_end_last(budget, expected):
    fitted = fit_messages(CONVERSATION, budget, chars_plus_two, drop_chars)
    assert fitted == expected and chars_plus_two(fitted) <= budget
    assert CONVERSATION[0]["content"] == "SSSS"  # the caller's messages are not edited


def test_template_longer_than_the_budget_is_an_error():
    assert template_size(chars_plus_two, response=True) == 4
    with pytest.raises(ValueError, match="budget of 3"):
        fit_messages(CONVERSATION, 3, chars_plus_two, drop_chars)


def test_a_cut_that_does_not_shorten_still_ends():
    """Re-tokenising a cut can give the text back unchanged; the loop then drops characters one by one."""
    fitted = fit_messages([turn("user", "abcdef")], 5, chars_plus_two, lambda text, n: text)
    assert fitted == [turn("user", "def")]


WORDS = "how do I bake bread at home tell me more the oven is hot and ready now".split()
OLD_TURNS = [turn("user", "tell me more " * 30), turn("assistant", "the oven is hot " * 30)]
QUESTION = turn("user", "how do I bake bread at home")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer(WORDS))  # the toy ChatML template, as the toy RM has


def test_rm_input_keeps_the_answer_end_and_closing_tokens(tokenizer):
    """The RM pools the last token: a pair over max_length loses its oldest context and the answer's start,
    never the answer's end or the template's closing tokens (cutting the ids to their first max_length kept
    the old turns and lost the answer)."""
    answer = " ".join(f"step {i} is done" for i in range(60)) + " and ready now"
    full = tokenizer(tokenizer.apply_chat_template([*OLD_TURNS, QUESTION, turn("assistant", answer)],
                                                   tokenize=False), add_special_tokens=False)["input_ids"]
    assert pair_ids(tokenizer, [*OLD_TURNS, QUESTION], answer, len(full)) == (full, False)
    ids, cut = pair_ids(tokenizer, [*OLD_TURNS, QUESTION], answer, 80)
    assert cut and 75 <= len(ids) <= 80 < len(full)
    assert ids[-20:] == full[-20:]  # the pooled end is the full input's end
    # Old turns and the question emptied first, then the answer's start; the template around them kept.
    head = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tail = "<|im_end|>\n"
    text = tokenizer.decode(ids)
    assert text.startswith(head) and text.endswith(tail)
    kept = text[len(head) : -len(tail)]
    assert answer.endswith(kept) and len(kept) > 100


def test_rm_keeps_the_question_when_only_old_turns_must_go(tokenizer):
    ids, cut = pair_ids(tokenizer, [*OLD_TURNS, QUESTION], "bake it now", 40)
    assert cut and tokenizer.decode(ids) == tokenizer.apply_chat_template(
        [QUESTION, turn("assistant", "bake it now")], tokenize=False)


@pytest.fixture(scope="module")
def guard_tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer(WORDS))
    tok.chat_template = GUARD_CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("response", [None, "the oven is hot " * 40 + "and ready now"],
                         ids=["prompt", "response"])
def test_guard_keeps_its_instruction_and_format_lines(guard_tokenizer, response):
    """A long conversation before the judged turn: it is dropped, and the instruction before the conversation
    and the format lines after it survive verbatim (cutting the rendered ids from the left lost the
    instruction)."""
    empty = guard_tokenizer.apply_chat_template(
        [turn("user", "")] + ([turn("assistant", "")] if response else []), tokenize=False)
    instruction = empty.split("USER: ")[0]
    format_lines = empty.split("ASSISTANT: " if response else "USER: ")[1]
    judged = [*OLD_TURNS, turn("user", "how do I bake bread at home " * 20 + "tell me now")]
    budget = len(guard_tokenizer(empty, add_special_tokens=False)["input_ids"]) + 30
    ids, cut = moderation_ids(guard_tokenizer, ModerationItem(judged, response), budget)
    text = guard_tokenizer.decode(ids)
    assert cut and budget - 5 <= len(ids) <= budget
    assert text.startswith(instruction + "USER: ")
    assert text.endswith(("and ready now" if response else "tell me now") + format_lines)
    assert "tell me more" not in text
