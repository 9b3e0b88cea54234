"""A Stream guard's per-token labels, the form `saferl guard eval --kind stream` debounces and scores.

Owns `TokenLabels` (labels of one conversation and where they start in its templated token sequence), the
`TokenLabeler` Protocol (a Stream guard as the evaluation sees it) and `token_labels_from_verdicts` (labels
from the streaming reader's `StreamVerdict`s). Pure: no torch, no model; the decisions built on these labels
(debouncing, latency bins, F1) are `saferl.guard.decisions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from saferl.types import StreamVerdict


@dataclass(frozen=True)
class TokenLabels:
    """A Stream guard's per-token risk labels for one conversation.

    Attributes:
        labels: Safe/Unsafe/Controversial per moderated position: the response head from the evaluation's
            first response token on (eval_stream.py's `split_idx`), or for a prompt row the query head over
            the last user turn.
        start: absolute index of labels[0] in the full templated token sequence, the frame in which
            `unsafe_start_index`/`unsafe_end_index` are annotated.
        categories: per-position categories aligned with `labels` (optional).
    """

    labels: list[str]
    start: int
    categories: list[str | None] | None = None


class TokenLabeler(Protocol):
    """A Stream guard as the evaluation sees it: per-token labels for each conversation."""

    def token_labels(self, conversations: list[list[dict[str, str]]]) -> list[TokenLabels]: ...


def token_labels_from_verdicts(verdicts: Sequence[StreamVerdict], role: str,
                               start: int | None = None) -> TokenLabels:
    """TokenLabels from a Stream guard's readings of one conversation (stream.py's StreamVerdicts).

    Args:
        verdicts: the readings, in position order.
        role: "user" for a prompt row (the query reading), "assistant" for a response row.
        start: for a response row, the first position to evaluate (eval_stream.py's `split_idx`: the first
            answer token, or the reasoning start with thinking); default the first assistant reading.

    Raises:
        ValueError: no reading of that role (from `start` on), or response positions with a gap (debouncing
            needs adjacent tokens).
    """
    if role not in ("user", "assistant"):
        raise ValueError(f"role must be 'user' or 'assistant', got {role!r}")
    picked = [v for v in verdicts if v.role == role and (start is None or v.position >= start)]
    if role == "user":
        picked = picked[-1:]
    if not picked:
        where = f" at or after position {start}" if start is not None else ""
        raise ValueError(f"no {role} readings{where}")
    first = picked[0].position
    if [v.position for v in picked] != list(range(first, first + len(picked))):
        raise ValueError(f"{role} readings are not at consecutive positions from {first}")
    return TokenLabels([v.risk for v in picked], first, [v.category for v in picked])
