"""Conversations as a Qwen3 (ChatML) model sees them: the chat template, the rendered ids, the turn markers.

Owns `CHATML_TEMPLATE` (Qwen3's chat template, the one a Stream guard and a Qwen3 policy read plain
conversations with; the toy world's tokenizer ships it too), `encode_conversation` (the frame of
Qwen3GuardTest's `unsafe_start_index`), `RoleTokens` / `role_tokens` (marker ids from the tokenizer, never
hard-coded) and `find_user_turn`. Pure: no torch, no model.

Shortcuts: the template knows no tools and no `reasoning_content` field; thinking is read from the assistant
content (`<think>…</think>answer`), as Qwen3 does when that field is absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Qwen3's template, minus tools and `reasoning_content`. Assistant turns after the last user message keep
# their reasoning as `<think>\n…\n</think>\n\n` (the final one always gets the block, empty if need be);
# earlier assistant turns keep only the answer, so multi-turn prompts look like what Qwen3 was trained on.
# `enable_thinking=False` pre-fills an empty think block, which is how Qwen3 switches thinking off.
CHATML_TEMPLATE = r"""
{%- set ns = namespace(last_query_index=-1) %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.last_query_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message['content'] %}
    {%- if message['role'] == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {%- set content = '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content %}
        {%- endif %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""".strip()


@dataclass(frozen=True)
class RoleTokens:
    """Ids of the ChatML markers that delimit turns, as the guard's tokenizer spells them."""

    im_start: int
    im_end: int
    user: int


def role_tokens(tokenizer: PreTrainedTokenizerBase) -> RoleTokens:
    """Look up `<|im_start|>`, `<|im_end|>` and `user` in `tokenizer` (each must be a single known token)."""
    names = ("<|im_start|>", "<|im_end|>", "user")
    ids = tokenizer.convert_tokens_to_ids(list(names))
    unknown = [n for n, i in zip(names, ids) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"tokenizer has no single token for {unknown}; is it a Qwen3 (ChatML) tokenizer?")
    return RoleTokens(im_start=ids[0], im_end=ids[1], user=ids[2])


def find_user_turn(token_ids: Sequence[int], roles: RoleTokens) -> tuple[int, int | None]:
    """Locate the last user turn: (index of its `<|im_start|>`, index of its closing `<|im_end|>` or None).

    Raises:
        ValueError: when no `<|im_start|>` is immediately followed by `user`.
    """
    ids = list(token_ids)
    starts = [i for i in range(len(ids) - 1) if ids[i] == roles.im_start and ids[i + 1] == roles.user]
    if not starts:
        raise ValueError("no user turn (<|im_start|> followed by `user`) in the token ids")
    start = starts[-1]
    end = next((i for i in range(start + 2, len(ids)) if ids[i] == roles.im_end), None)
    return start, end


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> list[int]:
    """Token ids of a whole conversation as the official eval renders it (chat template, no generation prompt,
    `enable_thinking=False`): the frame of Qwen3GuardTest's `unsafe_start_index`/`unsafe_end_index`."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, enable_thinking=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation ending with a user turn, up to the assistant's (non-thinking) generation
    prompt: what a policy continues and a Stream guard is opened on (CARE, `saferl serve stream-guard`)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
