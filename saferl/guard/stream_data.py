"""Training data for Qwen3Guard-Stream heads: token-labelled conversations and the JSONL rows they come from.

Owns `StreamExample` (a token-labelled conversation), `LabelMaps`, the pure label builders (the prefix rule
that places the first unsafe token, per-token labels, the query label at the user's `<|im_end|>`) and the
training-row layout of `saferl guard train-stream` (`parse_stream_row`, `load_stream_rows`,
`encode_stream_rows`). No torch: the model, loss and loop are in `saferl.guard.stream_train`.

Training rows (JSONL, one object a line; Qwen3GuardTest's layout plus two optional fields):
  {"message": [{"role": "user", ...}, {"role": "assistant", ...}], "label": "Unsafe",
   "unsafe_start_index": 41, "category": "Violent"}
`messages` is accepted for `message`. The last message's role picks the row's kind. A response row trains the
response heads: tokens before `unsafe_start_index` (an absolute index in the templated conversation, as in
the `*_loc` splits) are Safe, it and every later token carry `label`; without the index the label starts at
the assistant's content. A prompt row trains the query heads at the user's `<|im_end|>`. `label` is Safe,
Unsafe or Controversial; `category` (optional: no category loss without it) is a name from the model's maps.

Token labels come from the data, not from an LM ensemble and a judge as in the paper (§4.2):
`first_unsafe_index` places the trigger where a response stops being the beginning of any safe text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saferl.guard.conversation import encode_conversation, find_user_turn, role_tokens
from saferl.types import SafetyLabel


IGNORE = -100  # label index of positions that carry no loss


@dataclass(frozen=True)
class StreamExample:
    """One token-labelled conversation (label indices in the model's own label maps).

    Attributes:
        input_ids: [T] the full templated conversation.
        risk: [T] response risk index per position; IGNORE up to and including the user's `<|im_end|>`.
        category: [T] response category index where the gold risk is not Safe and known, else IGNORE.
        query_index: position of the `<|im_end|>` closing the user turn (where the query heads are read).
        query_risk: query risk index of the prompt, IGNORE when the example carries no query label.
        query_category: query category index, IGNORE when the prompt is Safe or its category unknown.
    """

    input_ids: list[int]
    risk: list[int]
    category: list[int]
    query_index: int
    query_risk: int
    query_category: int


@dataclass(frozen=True)
class LabelMaps:
    """Label name -> head index for the four heads, read from a Stream model (names looked up, never assumed
    to be in a fixed order: spec §3.2)."""

    risk: dict[str, int]
    category: dict[str, int]
    query_risk: dict[str, int]
    query_category: dict[str, int]

    @classmethod
    def from_model(cls, model: Qwen3StreamGuard) -> LabelMaps:
        def inverse(m: dict[int, str]) -> dict[str, int]:
            return {name: i for i, name in m.items()}

        return cls(inverse(model.response_risk_level_map), inverse(model.response_category_map),
                   inverse(model.query_risk_level_map), inverse(model.query_category_map))


# ---------------------------------------------------------------- labels (pure)


def prefix_set(sequences: Iterable[Sequence[int]]) -> set[tuple[int, ...]]:
    """Every non-empty prefix of every sequence (a flat prefix tree for `first_unsafe_index`)."""
    out: set[tuple[int, ...]] = set()
    for seq in sequences:
        seq = tuple(seq)
        out.update(seq[: i + 1] for i in range(len(seq)))
    return out


def first_unsafe_index(response_ids: Sequence[int], safe_prefixes: set[tuple[int, ...]]) -> int | None:
    """The trigger of a risky response: the first token where it stops being the beginning of any safe text.

    Tokens before it could still be heading for a safe answer (a shared opening such as "Sure, here is how
    to"); the token that rules that out is the first one the risky content shows in.

    Args:
        response_ids: the response's tokens (everything after the user's `<|im_end|>`).
        safe_prefixes: `prefix_set` of the safe responses, tokenised the same way.

    Returns:
        Index into `response_ids`, or None when the whole response is a prefix of some safe text.
    """
    for i in range(len(response_ids)):
        if tuple(response_ids[: i + 1]) not in safe_prefixes:
            return i
    return None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def response_labels(n: int, trigger: int | None, label: SafetyLabel | str,
                    category: str | None) -> tuple[list[str], list[str | None]]:
    """Per-token (risk, category) names of an n-token response: Safe before `trigger`, `label` from it on.

    Args:
        n: number of response tokens.
        trigger: index of the first unsafe token (None, or a Safe `label`: all Safe).
        label: the response's label.
        category: its category (None when unknown: those tokens then carry no category loss).
    """
    label = SafetyLabel(label)
    if trigger is None or label is SafetyLabel.SAFE:
        return [SafetyLabel.SAFE.value] * n, [None] * n
    if not 0 <= trigger < n:
        raise ValueError(f"trigger {trigger} outside the response's {n} tokens")
    return ([SafetyLabel.SAFE.value] * trigger + [label.value] * (n - trigger),
            [None] * trigger + [category] * (n - trigger))


def stream_example(input_ids: Sequence[int], query_index: int, risks: Sequence[str],
                   categories: Sequence[str | None], query_label: SafetyLabel | str | None,
                   query_category: str | None, maps: LabelMaps) -> StreamExample:
    """A `StreamExample` from label names: `risks`/`categories` cover the positions after `query_index`
    (all of them); `query_label` None gives the example no query loss, a None category no category loss."""
    n = len(input_ids) - query_index - 1
    if len(risks) != n or len(categories) != n:
        raise ValueError(f"{n} response positions but {len(risks)} risks and {len(categories)} categories")
    head = [IGNORE] * (query_index + 1)
    query = None if query_label is None else SafetyLabel(query_label)
    risky_prompt = query is not None and query is not SafetyLabel.SAFE and query_category is not None
    return StreamExample(
        input_ids=list(input_ids),
        risk=head + [maps.risk[r] for r in risks],
        category=head + [maps.category[c] if c is not None and r != SafetyLabel.SAFE.value else IGNORE
                         for r, c in zip(risks, categories)],
        query_index=query_index,
        query_risk=IGNORE if query is None else maps.query_risk[query.value],
        query_category=maps.query_category[query_category] if risky_prompt else IGNORE,
    )


# ---------------------------------------------------------------- JSONL rows


@dataclass(frozen=True)
class StreamRow:
    """One validated training row (see the module docstring); `where` is its `file:line`."""

    where: str
    messages: list[dict[str, str]]
    label: SafetyLabel
    category: str | None = None
    unsafe_start_index: int | None = None


def parse_stream_row(row: object, where: str) -> StreamRow:
    """Validate one training row; errors start with `where`."""
    from saferl.data import check_messages
    from saferl.guard.gen import _optional_index, _optional_str

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fields = [k for k in ("message", "messages") if k in row]
    if len(fields) != 1:
        raise ValueError(f"{where}: give exactly one of 'message' (Qwen3GuardTest) or 'messages'")
    messages = check_messages(row[fields[0]], where, fields[0])
    role = messages[-1]["role"]
    if role not in ("user", "assistant"):
        raise ValueError(f"{where}: the last message must be the user's or the assistant's, got {role!r}")
    labels = [label.value for label in SafetyLabel]
    if row.get("label") not in labels:
        raise ValueError(f"{where}: 'label' must be one of {labels}, got {row.get('label')!r}")
    label = SafetyLabel(row["label"])
    start = _optional_index(row, "unsafe_start_index", where)
    if start is not None and (label is SafetyLabel.SAFE or role == "user"):
        raise ValueError(f"{where}: 'unsafe_start_index' belongs on Unsafe/Controversial response rows only")
    return StreamRow(where, messages, label, _optional_str(row, "category", where), start)


def load_stream_rows(path: str | Path) -> list[StreamRow]:
    """All training rows of a JSONL file; a missing, empty or malformed file names the file (and line)."""
    from saferl.data import read_jsonl

    rows = [parse_stream_row(row, where) for where, row in read_jsonl(path)]
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty)")
    return rows


def encode_stream_rows(rows: Sequence[StreamRow], tokenizer: Any, maps: LabelMaps) -> list[StreamExample]:
    """Render and label each row with the guard's tokenizer (ChatML template); errors name the row's line."""
    roles = role_tokens(tokenizer)
    out = []
    for row in rows:
        ids = encode_conversation(tokenizer, row.messages)
        try:
            _, user_end = find_user_turn(ids, roles)
        except ValueError as e:
            raise ValueError(f"{row.where}: {e}") from e
        if user_end is None:
            raise ValueError(f"{row.where}: the last user turn has no closing <|im_end|>")
        prompt_row = row.messages[-1]["role"] == "user"
        names = maps.query_category if prompt_row else maps.category
        if row.category is not None and row.category not in names:
            raise ValueError(f"{row.where}: unknown category {row.category!r}; the model's: {sorted(names)}")
        if prompt_row:
            out.append(stream_example(ids[: user_end + 1], user_end, [], [], row.label, row.category, maps))
            continue
        start = row.unsafe_start_index
        if start is None and row.label is not SafetyLabel.SAFE:  # from the assistant's content on
            empty = encode_conversation(tokenizer, [*row.messages[:-1], {"role": "assistant", "content": ""}])
            start = common_prefix_length(ids, empty)
        if start is not None and not user_end < start < len(ids):
            raise ValueError(f"{row.where}: unsafe_start_index {start} is outside the response (tokens "
                             f"{user_end + 1}..{len(ids) - 1} of the templated conversation)")
        trigger = None if start is None else start - user_end - 1
        risks, categories = response_labels(len(ids) - user_end - 1, trigger, row.label, row.category)
        out.append(stream_example(ids, user_end, risks, categories, None, None, maps))
    return out


# ---------------------------------------------------------------- model
