"""`parse_verdict` on real Qwen3Guard-Gen output strings (exact format of the released models, spec §2.3)."""

import pytest

from saferl.guard.templates import parse_verdict
from saferl.types import SafetyLabel

# Every category string the model emits, in the official template's order; Jailbreak in prompt mode only.
RESPONSE_CATEGORY_STRINGS = [
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
]


def test_unsafe_violent_refusal_no():
    v = parse_verdict("Safety: Unsafe\nCategories: Violent\nRefusal: No")
    assert (v.safety, v.categories, v.refusal, v.parse_ok) == (SafetyLabel.UNSAFE, ("Violent",), False, True)


def test_safe_none_refusal_yes():
    v = parse_verdict("Safety: Safe\nCategories: None\nRefusal: Yes")
    assert (v.safety, v.categories, v.refusal, v.parse_ok) == (SafetyLabel.SAFE, (), True, True)


def test_controversial_response_mode():
    v = parse_verdict("Safety: Controversial\nCategories: Unethical Acts\nRefusal: No")
    assert (v.safety, v.categories, v.refusal, v.parse_ok) == (
        SafetyLabel.CONTROVERSIAL, ("Unethical Acts",), False, True)


def test_several_categories_comma_separated():
    v = parse_verdict("Safety: Unsafe\nCategories: Non-violent Illegal Acts, PII\nRefusal: No")
    assert v.categories == ("Non-violent Illegal Acts", "PII")  # "Non-violent" is not "Violent"
    assert v.safety is SafetyLabel.UNSAFE and v.refusal is False and v.parse_ok


def test_all_response_categories_on_one_line():
    text = "Safety: Unsafe\nCategories: " + ", ".join(RESPONSE_CATEGORY_STRINGS) + "\nRefusal: No"
    assert parse_verdict(text).categories == tuple(RESPONSE_CATEGORY_STRINGS)


@pytest.mark.parametrize("category", RESPONSE_CATEGORY_STRINGS)
@pytest.mark.parametrize("refusal", ["Yes", "No"])
def test_every_category_response_mode(category, refusal):
    v = parse_verdict(f"Safety: Unsafe\nCategories: {category}\nRefusal: {refusal}")
    assert v.categories == (category,) and v.refusal is (refusal == "Yes") and v.parse_ok


@pytest.mark.parametrize("category", [*RESPONSE_CATEGORY_STRINGS, "Jailbreak"])
def test_every_category_prompt_mode(category):
    v = parse_verdict(f"Safety: Unsafe\nCategories: {category}", mode="prompt")
    assert v.safety is SafetyLabel.UNSAFE and v.categories == (category,)
    assert v.refusal is None and v.parse_ok


def test_jailbreak_with_other_categories_in_prompt_mode():
    v = parse_verdict("Safety: Unsafe\nCategories: Jailbreak, Violent", mode="prompt")
    assert v.categories == ("Jailbreak", "Violent")


def test_unsafe_but_refused():
    v = parse_verdict("Safety: Unsafe\nCategories: Suicide & Self-Harm\nRefusal: Yes")
    assert v.safety is SafetyLabel.UNSAFE and v.categories == ("Suicide & Self-Harm",) and v.refusal is True


def test_safe_prompt_mode():
    v = parse_verdict("Safety: Safe\nCategories: None", mode="prompt")
    assert (v.safety, v.categories, v.refusal, v.parse_ok) == (SafetyLabel.SAFE, (), None, True)


@pytest.mark.parametrize(
    "text",
    [
        "Safety: Unsafe\nCategories: Violent\nRefusal: No\n",  # trailing newline
        "Safety: Unsafe\r\nCategories: Violent\r\nRefusal: No",  # CRLF
        "\n\nSafety: Unsafe\nCategories: Violent\nRefusal: No<|im_end|>",  # decoded with special tokens kept
    ],
)
def test_whitespace_and_special_token_variants(text):
    v = parse_verdict(text)
    assert (v.safety, v.categories, v.refusal, v.parse_ok) == (SafetyLabel.UNSAFE, ("Violent",), False, True)


def test_truncated_output_is_not_ok():
    # max_new_tokens cut the Refusal line off: Safety and categories survive, parse_ok is False.
    v = parse_verdict("Safety: Unsafe\nCategories: Non-violent Illegal Acts, PII\nRef")
    assert v.safety is SafetyLabel.UNSAFE and v.categories == ("Non-violent Illegal Acts", "PII")
    assert v.refusal is None and not v.parse_ok
