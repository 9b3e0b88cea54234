"""Offline Qwen3-style tokenizer for the toy world: a byte-level BPE trained on a local corpus.

Owns the Qwen3 added-token table and `train_bpe_tokenizer`; its chat template is the product's Qwen3
ChatML template (`saferl.guard.conversation.CHATML_TEMPLATE`). The trained tokenizer reproduces Qwen3's
pipeline (NFC, Qwen's split regex, byte-level BPE, 26 added tokens after the base vocabulary, in Qwen3's
order) but not its vocabulary: ids differ from Qwen3's, so it only serves toy models. Use the exact Qwen3
tokenizer (spec/platform-notes.md §6 B) where ids must match real checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from saferl.guard.conversation import CHATML_TEMPLATE

# (content, special) in Qwen3's id order (151643-151668). The tool-call, tool-response and think tags are
# non-special: they survive `skip_special_tokens=True`, so a decoded rollout keeps its thinking block.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen2/2.5/3 pre-tokenizer split pattern (single digits, contractions, letter runs, punctuation runs).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The policy reads Qwen3's ChatML template (`saferl.guard.conversation`): the toy tokenizer ships it.
POLICY_CHAT_TEMPLATE = CHATML_TEMPLATE


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a Qwen3-style byte-level BPE tokenizer on `corpus`.

    Args:
        corpus: training texts.
        vocab_size: size of the trained vocabulary (256 byte symbols plus merges); the 26 added tokens come on
            top, with ids `vocab_size .. vocab_size + 25` when the corpus supports that many merges.

    Returns:
        A fast tokenizer with eos `<|im_end|>`, pad `<|endoftext|>`, left padding and `POLICY_CHAT_TEMPLATE`.
        Training is deterministic: the same corpus gives a byte-identical `tokenizer.json`.
    """
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    # Added one at a time, after training, so their ids are consecutive, in Qwen3's order and above the base
    # vocabulary (passing them to the trainer as specials would put them first). normalized=False as in Qwen3.
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tk.add_special_tokens([token])
        else:
            tk.add_tokens([token])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        # Qwen3 ships with False; decode must give the exact text back (spaces before punctuation included).
        clean_up_tokenization_spaces=False,
        chat_template=POLICY_CHAT_TEMPLATE,
    )
