"""Fitting a conversation into a scorer's context: what is cut, in which order, and what never is.

Both scorers read a rendered chat. The helpfulness RM pools its score on the last token, so it must see
the answer's end and the template's closing tokens; the guard judges the last turn, with its instruction
before the conversation and its format lines after it. An input over budget loses conversation, oldest
first, and never template text outside it:
1. whole turns before the last user turn, oldest first (a leading system prompt is the oldest);
2. then the start of each remaining turn, oldest first: the last user turn, then the final turn (the RM's
   answer, the guard's judged prompt or response), whose end is always kept.
When the template alone exceeds the budget nothing can fit and ValueError is raised; scorers check that
when they are built (`template_size`), so it is a load-time error naming the context setting.

The judged text keeps its end, not its start, for the guard as for the RM: a response's end holds the final
answer after any thinking block, the part a user reads, and one rule for both scorers is one rule to reason
about. Either choice leaves some text unjudged, so each cut is counted (`guard/truncated`, `rm/truncated`);
a guard context longer than the rollout's (as in configs/qwen3_4b_saferl.yaml) leaves room for a whole
rollout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Message = dict[str, str]


def fit_messages(messages: list[Message], budget: int, size: Callable[[list[Message]], int],
                 drop_head: Callable[[str, int], str]) -> list[Message]:
    """A copy of `messages` cut, in the order of the module docstring, until `size` is at most `budget`.

    Args:
        messages: the conversation as the scorer renders it; the last message is the one it reads last.
        budget: the most units (tokens, or characters) the scorer takes.
        size: the input's size in those units, template included (e.g. the length of the rendered ids).
        drop_head: `text` without about its first `n` units (e.g. decode(encode(text)[n:])).

    Raises:
        ValueError: the input is still over budget with every message emptied (the template is too long).
    """
    out = [dict(m) for m in messages]
    now = size(out)
    last_user = max((i for i, m in enumerate(out) if m["role"] == "user"), default=len(out) - 1)
    while last_user > 0 and now > budget:
        del out[0]
        last_user -= 1
        now = size(out)
    for message in out:
        while now > budget and message["content"]:
            text = message["content"]
            cut = drop_head(text, now - budget)
            # Re-tokenising a cut can shift a boundary; always drop at least one character so this ends.
            message["content"] = cut if len(cut) < len(text) else text[1:]
            now = size(out)
    if now > budget:
        raise ValueError(f"the input is {now} units with every message emptied, over the budget of {budget}")
    return out


def template_size(size: Callable[[list[Message]], int], *, response: bool) -> int:
    """The template's size alone: one empty user turn, plus an empty assistant turn if `response`."""
    empty = [{"role": "user", "content": ""}] + ([{"role": "assistant", "content": ""}] if response else [])
    return size(empty)


def token_head_dropper(tokenizer: Any) -> Callable[[str, int], str]:
    """`drop_head` for a HF tokenizer: the text of all but the first `n` tokens of `text`."""

    def drop_head(text: str, n: int) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[n:])

    return drop_head
