"""Stream guard evaluation: per-token labels of whole conversations, as `saferl guard eval --kind stream` reads.

Owns `StreamLabeler`, the `TokenLabeler` (`saferl.guard.token_labels`) of a Qwen3Guard-Stream checkpoint:
it renders each conversation (`saferl.guard.conversation`), reads it with the streaming reader's full-forward
path (`saferl.guard.stream.moderate_many`) and picks the positions the official eval_stream.py scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from saferl.guard.conversation import encode_conversation, role_tokens
from saferl.guard.stream import moderate_many
from saferl.guard.stream_model import Qwen3StreamGuard
from saferl.guard.token_labels import TokenLabels, token_labels_from_verdicts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class StreamLabeler:
    """Per-token Stream labels for whole conversations: the `TokenLabeler` behind `saferl guard eval --kind
    stream`.

    Each conversation is rendered with the guard tokenizer's chat template (`enable_thinking=False`, as the
    official eval does) and read with one full forward (`moderate_many`, as eval_stream.py does; the
    incremental `StreamBatch` gives the same logits). Response rows are labelled from eval_stream.py's
    `split_idx` on: the first token after `</think>` and its blank line (the answer), or with `thinking` the
    first token inside `<think>` and its newline (the reasoning); a conversation without a think block starts
    right after the user's `<|im_end|>`. A prompt row gets the query reading at the user's `<|im_end|>`.

    Args:
        model: the Stream guard.
        tokenizer: its tokenizer (ChatML template, `<think>`/`</think>` tokens).
        batch_size: conversations per forward.
        thinking: evaluate the reasoning too (official `--thinking`).
    """

    def __init__(self, model: Qwen3StreamGuard, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 16,
                 thinking: bool = False):
        self.model, self.tokenizer, self.batch_size, self.thinking = model, tokenizer, batch_size, thinking
        self.roles = role_tokens(tokenizer)
        self.think_open, self.think_close = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device: str | None = None,
                        batch_size: int = 16, thinking: bool = False) -> StreamLabeler:
        """Load a Stream checkpoint and its tokenizer (on CUDA when available, unless `device` is given)."""
        from transformers import AutoTokenizer

        from saferl.guard.stream_model import load_stream_guard

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_stream_guard(path, dtype=dtype, device=device)
        return cls(model, AutoTokenizer.from_pretrained(path), batch_size=batch_size, thinking=thinking)

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        """Token ids of the full templated conversation (the frame of `unsafe_start_index`)."""
        return encode_conversation(self.tokenizer, conversation)

    def evaluation_start(self, ids: Sequence[int], user_end: int) -> int:
        """eval_stream.py's `split_idx` for a response row (see the class docstring)."""
        after = list(ids[user_end + 1 :])
        marker, skip = (self.think_open, "\n") if self.thinking else (self.think_close, "\n\n")
        if marker not in after:
            return user_end + 1
        offset = after.index(marker) if self.thinking else len(after) - 1 - after[::-1].index(marker)
        nxt, text = user_end + 2 + offset, ""
        while nxt < len(ids) and len(text) < len(skip):  # skip the newline(s), one token or several
            piece = self.tokenizer.decode([ids[nxt]])
            if not skip.startswith(text + piece):
                break
            text, nxt = text + piece, nxt + 1
        return nxt

    def token_labels(self, conversations: list[list[dict[str, str]]]) -> list[TokenLabels]:
        """One `TokenLabels` per conversation: response labels from `evaluation_start`, or the query label."""
        sequences = [self.encode(c) for c in conversations]
        steps = moderate_many(self.model, sequences, self.roles, self.batch_size,
                              pad_id=self.tokenizer.pad_token_id or 0)
        out = []
        for conversation, ids, step in zip(conversations, sequences, steps):
            if conversation[-1]["role"] == "user":
                out.append(token_labels_from_verdicts(step.verdicts, "user"))
            else:
                user_end = next(v.position for v in step.verdicts if v.role == "user")
                out.append(token_labels_from_verdicts(step.verdicts, "assistant",
                                                      self.evaluation_start(ids, user_end)))
        return out
