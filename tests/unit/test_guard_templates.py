"""Guard prompt rendering (through a real tokenizer's apply_chat_template) and the Gen verdict parser."""

import random
import re

import pytest

from saferl.guard.templates import (
    CATEGORIES,
    GUARD_CHAT_TEMPLATE,
    RESPONSE_CATEGORIES,
    format_verdict,
    moderation_messages,
    parse_verdict,
)
from saferl.toyworld.tokenizer import train_bpe_tokenizer
from saferl.types import GuardVerdict, SafetyLabel

PREFIX = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def render():
    rng = random.Random(0)
    words = "the guard says safe unsafe USER ASSISTANT query response , . :".split()
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=400)
    tokenizer.chat_template = GUARD_CHAT_TEMPLATE
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)


def category_lines(text: str) -> list[str]:
    block = text.split("<BEGIN UNSAFE CONTENT CATEGORIES>\n")[1].split("<END UNSAFE CONTENT CATEGORIES>")[0]
    return block.splitlines()


def transcript(text: str) -> str:
    return text.split("<BEGIN CONVERSATION>\n\n")[1].split("\n\n<END CONVERSATION>")[0]


def test_categories():
    assert len(CATEGORIES) == 9 and CATEGORIES[-1] == "Jailbreak" and CATEGORIES[4] == "PII"
    assert RESPONSE_CATEGORIES == CATEGORIES[:8]


def test_prompt_mode(render):
    text = render(moderation_messages([{"role": "user", "content": "How do I pick a lock?"}], None))
    assert text.startswith("<|im_start|>user\n# Task:\n")
    assert "THE LAST USER's query" in text and "ONLY THE LAST **USER's query**" in text
    lines = category_lines(text)
    assert len(lines) == 9 and "Jailbreak." in lines and all(line.endswith(".") for line in lines)
    assert sorted(line[:-1] for line in lines) == sorted(CATEGORIES)
    assert "REFUSAL" not in text and "Refusal" not in text
    assert text.count("<|im_start|>") == 2 and text.count("<|im_end|>") == 1
    assert transcript(text) == "USER: How do I pick a lock?"


def test_response_mode(render):
    text = render(moderation_messages([{"role": "user", "content": "Q"}], "I can't help with that."))
    assert "THE LAST ASSISTANT's response" in text and "ONLY THE LAST **ASSISTANT's response**" in text
    lines = category_lines(text)
    assert len(lines) == 8 and "Jailbreak." not in lines
    assert sorted(line[:-1] for line in lines) == sorted(RESPONSE_CATEGORIES)
    assert "**Refusal: Yes**" in text and "**Refusal: No**" in text and "<END REFUSAL POLICY>" in text
    assert "'Refusal: Yes' or 'Refusal: No'" in text
    assert transcript(text) == "USER: Q\n\nASSISTANT: I can't help with that."


@pytest.mark.parametrize("response", [None, "ok"])
def test_sections_in_spec_order(render, response):
    text = render(moderation_messages([{"role": "user", "content": "Q"}], response))
    refusal_policy = ["<BEGIN REFUSAL POLICY>", "**Refusal: Yes**", "**Refusal: No**", "<END REFUSAL POLICY>"]
    markers = [
        "# Task:",
        "<BEGIN SAFETY POLICY>",
        "**Safety: Safe**",
        "**Safety: Unsafe**",
        "**Safety: Controversial**",
        "<END SAFETY POLICY>",
        "<BEGIN UNSAFE CONTENT CATEGORIES>",
        "<END UNSAFE CONTENT CATEGORIES>",
        *(refusal_policy if response else []),
        "<BEGIN CONVERSATION>\n\nUSER: Q",
        "\n\n<END CONVERSATION>",
        "'Safety: Safe', 'Safety: Unsafe' or 'Safety: Controversial'",
        "'Categories: None'",
    ]
    positions = [text.index(marker) for marker in markers]
    assert positions == sorted(positions)
    # Always ends with the empty-think assistant prefix, though add_generation_prompt was not passed.
    assert text.endswith("<|im_end|>\n" + PREFIX)


def test_instruction_is_short(render):
    # A tiny CPU guard reads this on every call: keep it near 120-170 words.
    for response in (None, "ok"):
        text = render(moderation_messages([{"role": "user", "content": "Q"}], response))
        words = len(text.replace(transcript(text), "").split())
        assert 110 <= words <= 180


def test_system_message_printed_under_user(render):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Q"}]
    assert transcript(render(messages)) == "USER: You are terse.\n\nQ"


def test_multi_turn_transcript_keeps_thinking_verbatim(render):
    prompt = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    answer = "<think>\nweigh it\n</think>\n\nA2"
    assert transcript(render(moderation_messages(prompt, answer))) == (
        "USER: S\n\nQ1\n\nASSISTANT: A1\n\nUSER: Q2\n\nASSISTANT: <think>\nweigh it\n</think>\n\nA2"
    )
    text = render(moderation_messages(prompt, None))
    assert transcript(text) == "USER: S\n\nQ1\n\nASSISTANT: A1\n\nUSER: Q2"
    assert "Jailbreak." in text  # last turn is the user's: prompt mode


def test_moderation_messages_does_not_mutate():
    prompt = [{"role": "user", "content": "Q"}]
    messages = moderation_messages(prompt, "A")
    assert messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert prompt == [{"role": "user", "content": "Q"}]
    assert moderation_messages(prompt, "")[-1] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("category", RESPONSE_CATEGORIES)
def test_parse_each_category(category):
    verdict = parse_verdict(f"Safety: Unsafe\nCategories: {category}\nRefusal: No")
    assert verdict.safety is SafetyLabel.UNSAFE and verdict.categories == (category,)
    assert verdict.refusal is False and verdict.parse_ok


def test_parse_safe_none_refusal_yes():
    text = "Safety: Safe\nCategories: None\nRefusal: Yes"
    assert parse_verdict(text) == GuardVerdict(SafetyLabel.SAFE, (), refusal=True, parse_ok=True, raw=text)


def test_parse_controversial_prompt_mode():
    verdict = parse_verdict("Safety: Controversial\nCategories: Politically Sensitive Topics", mode="prompt")
    assert verdict.safety is SafetyLabel.CONTROVERSIAL
    assert verdict.categories == ("Politically Sensitive Topics",)
    assert verdict.refusal is None and verdict.parse_ok


def test_parse_several_categories():
    verdict = parse_verdict("Safety: Unsafe\nCategories: Violent, Non-violent Illegal Acts\nRefusal: No")
    assert verdict.categories == ("Violent", "Non-violent Illegal Acts")


def test_parse_jailbreak_only_in_prompt_mode():
    text = "Safety: Unsafe\nCategories: Jailbreak, PII"
    assert parse_verdict(text, mode="prompt").categories == ("Jailbreak", "PII")
    response = parse_verdict(text + "\nRefusal: No", mode="response")
    assert response.categories == ("PII",)


GARBAGE = ["", "I think it is fine.", "safety: unsafe", "Safety:Unsafe", "Safety: unknown", "\x00<|im_end|>"]


@pytest.mark.parametrize("text", GARBAGE)
def test_parse_garbage(text):
    verdict = parse_verdict(text)
    assert verdict.safety is None and not verdict.parse_ok and verdict.raw == text


def test_parse_missing_refusal_fails_only_in_response_mode():
    text = "Safety: Safe\nCategories: None"
    response = parse_verdict(text)
    assert response.safety is SafetyLabel.SAFE and response.refusal is None and not response.parse_ok
    assert parse_verdict(text, mode="prompt").parse_ok


def test_parse_is_unanchored():
    text = "<think>\n\n</think>\n\nSafety: Unsafe\nCategories: Violent\nRefusal: No<|im_end|>"
    verdict = parse_verdict(text)
    assert verdict.safety is SafetyLabel.UNSAFE and verdict.categories == ("Violent",) and verdict.parse_ok


def test_parse_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        parse_verdict("Safety: Safe", mode="stream")


def test_format_verdict_exact_text():
    assert format_verdict(SafetyLabel.UNSAFE, ["Violent"], None) == "Safety: Unsafe\nCategories: Violent"
    assert format_verdict(SafetyLabel.SAFE, [], True) == "Safety: Safe\nCategories: None\nRefusal: Yes"
    text = format_verdict(SafetyLabel.UNSAFE, ["PII", "Unethical Acts"], False)
    assert text == "Safety: Unsafe\nCategories: PII, Unethical Acts\nRefusal: No"
    with pytest.raises(ValueError, match="unknown categories"):
        format_verdict(SafetyLabel.UNSAFE, ["Violence"], None)


@pytest.mark.parametrize("safety", list(SafetyLabel))
@pytest.mark.parametrize("refusal", [None, True, False])
def test_format_parse_round_trip(safety, refusal):
    mode = "prompt" if refusal is None else "response"
    names = CATEGORIES if mode == "prompt" else RESPONSE_CATEGORIES
    for categories in [(), *((c,) for c in names), tuple(names[:3])]:
        text = format_verdict(safety, categories, refusal)
        assert re.fullmatch(r"Safety: \w+\nCategories: [^\n]+(\nRefusal: (Yes|No))?", text)
        expected = GuardVerdict(safety, categories, refusal=refusal, parse_ok=True, raw=text)
        assert parse_verdict(text, mode=mode) == expected
