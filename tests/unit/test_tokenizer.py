"""The toy-world BPE tokenizer: Qwen3 added tokens, round trips, determinism, the policy chat template."""

import random

import pytest
from transformers import AutoTokenizer

from saferl.toyworld.tokenizer import QWEN3_ADDED_TOKENS, train_bpe_tokenizer

WORDS = (
    "the a guard model answers every question about cats dogs weather recipes history chemistry "
    "safe unsafe refuses helps quickly carefully I you we it's don't can't 42 7 , . ! ? ( ) : "
    "über café naïve 東京 日本語 мир"
).split()


def toy_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(toy_corpus(), vocab_size=500)


@pytest.mark.parametrize(
    "text",
    [
        "The guard answers every question.",
        "  leading spaces, tabs\t\tand\n\nnewlines\n",
        "über café naïve 東京 мир 🙂 — «quotes»",
        "unseen words: zyxwv qqq 12345.678",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nplan\n</think>\n\nok<|im_end|>",
        "<|endoftext|><tool_call>{}</tool_call><|fim_pad|>",
    ],
)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_added_tokens_consecutive_in_qwen3_order(tokenizer):
    assert len(QWEN3_ADDED_TOKENS) == 26
    contents = [content for content, _ in QWEN3_ADDED_TOKENS]
    ids = tokenizer.convert_tokens_to_ids(contents)
    first = ids[0]
    assert ids == list(range(first, first + 26))
    # Added after the trained vocabulary: nothing trained sits at or above the first added id.
    base_ids = [i for tok, i in tokenizer.get_vocab().items() if tok not in contents]
    assert max(base_ids) == first - 1
    assert len(tokenizer) == first + 26
    assert ids[2] == tokenizer.eos_token_id and ids[0] == tokenizer.pad_token_id


def test_special_flags_follow_qwen3(tokenizer):
    non_special = {c for c, special in QWEN3_ADDED_TOKENS if not special}
    tags = ("tool_call", "tool_response", "think")
    assert non_special == {f"<{tag}>" for tag in tags} | {f"</{tag}>" for tag in tags}
    ids = tokenizer("<|im_start|>x<think>y</think><|fim_pad|><|im_end|>")["input_ids"]
    # Special tokens vanish with skip_special_tokens; the think tags must stay (rollouts keep their thinking).
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x<think>y</think>"


def test_added_tokens_are_single_ids(tokenizer):
    for content, _ in QWEN3_ADDED_TOKENS:
        assert tokenizer(content)["input_ids"] == [tokenizer.convert_tokens_to_ids(content)]
    assert len(tokenizer("a<think>b")["input_ids"]) == 3


def test_training_is_deterministic(tmp_path):
    corpus = toy_corpus(seed=1)
    train_bpe_tokenizer(corpus, vocab_size=500).save_pretrained(tmp_path / "a")
    train_bpe_tokenizer(corpus, vocab_size=500).save_pretrained(tmp_path / "b")
    first, second = (tmp_path / name / "tokenizer.json" for name in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nwhy 東京?<|im_end|>\n<think>\n</think>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert loaded.padding_side == "left"
    assert loaded.chat_template == tokenizer.chat_template


USER = {"role": "user", "content": "hi"}


def test_generation_prompt_thinking_on_by_default(tokenizer):
    text = tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_generation_prompt_non_thinking(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, USER]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_last_assistant_turn_keeps_reasoning_earlier_turns_do_not(tokenizer):
    reply = {"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"}
    last = tokenizer.apply_chat_template([USER, reply], tokenize=False)
    assert last.endswith("<|im_start|>assistant\n<think>\nplan\n</think>\n\nanswer<|im_end|>\n")
    follow_up = {"role": "user", "content": "more"}
    earlier = tokenizer.apply_chat_template([USER, reply, follow_up], tokenize=False)
    assert "<|im_start|>assistant\nanswer<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n" in earlier
    assert "plan" not in earlier


def test_last_assistant_turn_without_reasoning_gets_empty_think_block(tokenizer):
    text = tokenizer.apply_chat_template([USER, {"role": "assistant", "content": "answer"}], tokenize=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nanswer<|im_end|>\n")


def test_tokenized_template_gives_plain_ids(tokenizer):
    # transformers 5 returns a BatchEncoding from tokenize=True unless return_dict=False.
    ids = tokenizer.apply_chat_template([USER], add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
