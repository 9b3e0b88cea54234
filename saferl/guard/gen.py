"""The Gen guard for inference and evaluation: records in, typed verdicts and binary decisions out.

Owns the moderation record format (`read_records`), the Qwen3GuardTest row format (`load_guardtest`), the
`GenGuard` wrapper around a `GuardScorer` (or anything with its `moderate`), and the JSONL writer behind
`saferl guard moderate`. Model hosting, prompt rendering and parsing stay in `scorer.py` and `templates.py`.

Record format (one JSON object a line; blank lines are skipped; errors name the file and line):
- `id` (optional; default `file:line`),
- the prompt: `prompt` (a string) or `messages` (a list of {role, content}); a `messages` list that ends with
  an assistant turn, and no `response`, has that last turn moderated as the response,
- `response` (optional string): moderate the response to the prompt, else the prompt itself,
- `thinking` (optional string, with a response only; empty means none): judged as its own (prompt, thinking)
  pair besides (prompt, response), as the Qwen3-4B-SafeRL reward does; the decision is Unsafe if either is.

Output rows are written to `OUT.partial`, flushed after every batch, and the file is renamed to `OUT` only
when every record is done: an interrupted run keeps what it finished in `OUT.partial` and never leaves a
truncated `OUT`. Qwen3GuardTest data is read offline from JSONL or parquet files or a snapshot directory
(pyarrow for parquet; `datasets` is not needed, and its schema inference rejects splits whose columns differ).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from saferl.data import check_messages, data_files, read_jsonl, read_rows
from saferl.guard.decisions import MODES, is_unsafe
from saferl.types import GuardVerdict, ModerationItem, SafetyLabel


class Moderator(Protocol):
    """What GenGuard needs from a scorer: `GuardScorer` and `RemoteGuardScorer` both fit."""

    def moderate(self, items: list[ModerationItem]) -> list[GuardVerdict]: ...

    def stats(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class GenRecord:
    """One moderation request: the prompt conversation (ends with the user's turn) and optional response."""

    id: str
    messages: list[dict[str, str]]
    response: str | None = None
    thinking: str | None = None


@dataclass(frozen=True)
class GenResult:
    """The guard's verdicts on one record, read under a mode.

    Attributes:
        id: the record's id.
        moderated: "prompt" or "response", what `verdict` judges.
        verdict: the verdict on the response, or on the prompt when the record has no response.
        thinking: the verdict on (prompt, thinking); None when the record has no thinking.
        mode: "strict" (Controversial counts as Unsafe) or "loose" (as Safe).
    """

    id: str
    moderated: str
    verdict: GuardVerdict
    thinking: GuardVerdict | None
    mode: str

    @property
    def decision(self) -> SafetyLabel | None:
        """Unsafe if the verdict or the thinking verdict is Unsafe under the mode; else None if either has no
        parsed Safety line; else Safe."""
        verdicts = [v for v in (self.verdict, self.thinking) if v is not None]
        if any(is_unsafe(v.safety, self.mode) for v in verdicts):
            return SafetyLabel.UNSAFE
        if any(v.safety is None for v in verdicts):
            return None
        return SafetyLabel.SAFE

    def to_json(self) -> dict[str, Any]:
        """The output row: id, moderated, mode, decision, the verdict's fields, the thinking verdict."""
        decision = self.decision
        return {"id": self.id, "moderated": self.moderated, "mode": self.mode,
                "decision": decision.value if decision is not None else None, **_verdict_json(self.verdict),
                "thinking": _verdict_json(self.thinking) if self.thinking is not None else None}


def _verdict_json(verdict: GuardVerdict) -> dict[str, Any]:
    return {"safety": verdict.safety.value if verdict.safety is not None else None,
            "categories": list(verdict.categories), "refusal": verdict.refusal, "parse_ok": verdict.parse_ok,
            "raw": verdict.raw}


def _optional_str(row: dict[str, Any], key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_record(row: object, where: str) -> GenRecord:
    """Validate one input row (see the module docstring); errors start with `where` (`file:line`)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    response = _optional_str(row, "response", where)
    thinking = _optional_str(row, "thinking", where)
    if "messages" in row:
        messages = check_messages(row["messages"], where, "messages")
        if messages[-1]["role"] == "assistant" and response is None:
            messages, response = messages[:-1], messages[-1]["content"]
            if not messages:
                raise ValueError(f"{where}: 'messages' has an assistant turn but no prompt before it")
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the prompt's last message must be the user's, got "
                             f"{messages[-1]['role']!r}")
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise ValueError(f"{where}: missing field 'prompt' (a string) or 'messages' (a list)")
    if not messages[-1]["content"].strip():  # nothing to moderate, and the verdict would still be counted
        field = "the last user message" if "messages" in row else "'prompt'"
        raise ValueError(f"{where}: the prompt is empty ({field})")
    if thinking is not None and response is None:
        raise ValueError(f"{where}: 'thinking' is given without a 'response'")
    return GenRecord(id=str(row.get("id", where)), messages=messages, response=response,
                     thinking=thinking or None)


def read_records(path: str | Path) -> list[GenRecord]:
    """All records of a JSONL file; errors for a missing or empty file, bad JSON or a bad row name the file
    (and the line)."""
    records = [parse_record(row, where) for where, row in read_jsonl(path)]
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


class GenGuard:
    """A Qwen3Guard-Gen-format guard judging records and conversations in batches."""

    def __init__(self, scorer: Moderator) -> None:
        self.scorer = scorer

    @classmethod
    def from_model(cls, model: str, *, backend: str = "vllm", max_new_tokens: int = 32,
                   max_model_len: int = 1024, dtype: str = "float32") -> GenGuard:
        """Host `model` (a directory or hub id) in-process on a `GuardScorer` (`backend` vllm or hf)."""
        from saferl.guard.scorer import GuardScorer

        return cls(GuardScorer(model, backend=backend, max_new_tokens=max_new_tokens,
                               max_model_len=max_model_len, dtype=dtype))

    def iter_moderate(self, records: Sequence[GenRecord], mode: str = "strict", *, batch_size: int = 32,
                      progress: bool = False) -> Iterator[list[GenResult]]:
        """Results batch by batch: each batch's (prompt, response) and (prompt, thinking) go out together."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for batch in _batches(records, batch_size, progress, "moderate"):
            items = [ModerationItem(r.messages, r.response) for r in batch]
            thinking_at = [i for i, r in enumerate(batch) if r.thinking is not None]
            items += [ModerationItem(batch[i].messages, batch[i].thinking) for i in thinking_at]
            verdicts = self.scorer.moderate(items)
            if len(verdicts) != len(items):
                raise RuntimeError(f"the guard returned {len(verdicts)} verdicts for {len(items)} items")
            thinking: list[GuardVerdict | None] = [None] * len(batch)
            for i, v in zip(thinking_at, verdicts[len(batch) :]):
                thinking[i] = v
            yield [GenResult(id=r.id, moderated="prompt" if r.response is None else "response", verdict=v,
                             thinking=t, mode=mode)
                   for r, v, t in zip(batch, verdicts[: len(batch)], thinking)]

    def moderate(self, records: Sequence[GenRecord], mode: str = "strict", *, batch_size: int = 32,
                 progress: bool = False) -> list[GenResult]:
        """One result per record, in order."""
        return [r for batch in self.iter_moderate(records, mode, batch_size=batch_size, progress=progress)
                for r in batch]

    def classify(self, conversations: Sequence[list[dict[str, str]]], *, batch_size: int = 32,
                 progress: bool = False) -> list[GuardVerdict]:
        """One verdict per whole conversation, as the official eval_gen.py judges it: the last message's role
        picks the mode (assistant = response moderation, thinking text included verbatim)."""
        verdicts: list[GuardVerdict] = []
        for batch in _batches(conversations, batch_size, progress, "eval"):
            items = [ModerationItem(c[:-1], c[-1]["content"]) if c[-1]["role"] == "assistant"
                     else ModerationItem(c, None) for c in batch]
            verdicts += self.scorer.moderate(items)
        return verdicts


def _batches(seq: Sequence[Any], batch_size: int, progress: bool, desc: str) -> Iterator[Sequence[Any]]:
    """Slices of `seq`, with a tqdm bar on stderr counting items as each batch finishes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    from tqdm import tqdm

    with tqdm(total=len(seq), desc=desc, unit="item", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(seq), batch_size):
            yield seq[start : start + batch_size]
            bar.update(min(batch_size, len(seq) - start))


def moderate_file(guard: GenGuard, records: Sequence[GenRecord], out: str | Path, mode: str = "strict", *,
                  batch_size: int = 32, progress: bool = True) -> dict[str, int]:
    """Moderate `records` and write one JSON row each to `out` (via `out.partial`, see the module docstring).

    Returns:
        Counts: records, unsafe / safe / undecided decisions, parse failures.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    counts = {"records": 0, "unsafe": 0, "safe": 0, "undecided": 0, "parse_failures": 0}
    with open(partial, "w", encoding="utf-8") as f:
        for batch in guard.iter_moderate(records, mode, batch_size=batch_size, progress=progress):
            for result in batch:
                f.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
                decision = result.decision
                counts["records"] += 1
                counts["undecided" if decision is None else decision.value.lower()] += 1
                counts["parse_failures"] += sum(not v.parse_ok for v in (result.verdict, result.thinking)
                                                if v is not None)
            f.flush()
    os.replace(partial, out)
    return counts


@dataclass(frozen=True)
class GuardTestRow:
    """One Qwen3GuardTest-layout row: a conversation, its gold label, and optionally the annotated span.

    `unsafe_start_index`/`unsafe_end_index` are token positions in the full templated sequence (inclusive),
    present in the `*_loc` splits only.
    """

    id: str
    messages: list[dict[str, str]]
    label: SafetyLabel
    unsafe_start_index: int | None = None
    unsafe_end_index: int | None = None


def _optional_index(row: dict[str, Any], key: str, where: str) -> int | None:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # absent, null, or a NaN from parquet
        return None
    if isinstance(value, float) and value.is_integer():  # int columns with nulls come back as floats
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}: '{key}' must be a non-negative integer, got {value!r}")
    return value


def parse_guardtest_row(row: object, where: str) -> GuardTestRow:
    """Validate one row `{message, label[, unsafe_start_index, unsafe_end_index][, id]}`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "message" not in row:
        raise ValueError(f"{where}: missing field 'message' (a list of {{role, content}})")
    messages = check_messages(row["message"], where, "message")
    if messages[-1]["role"] not in ("user", "assistant"):
        raise ValueError(f"{where}: the last message must be the user's or the assistant's, got "
                         f"{messages[-1]['role']!r}")
    if "label" not in row:
        raise ValueError(f"{where}: missing field 'label' ('Unsafe' or 'Safe')")
    if row["label"] not in ("Unsafe", "Safe"):
        raise ValueError(f"{where}: 'label' must be 'Unsafe' or 'Safe', got {row['label']!r}")
    start = _optional_index(row, "unsafe_start_index", where)
    end = _optional_index(row, "unsafe_end_index", where)
    if (start is None) != (end is None):
        raise ValueError(f"{where}: give both 'unsafe_start_index' and 'unsafe_end_index' or neither")
    if start is not None and end is not None and start > end:
        raise ValueError(f"{where}: unsafe_start_index {start} > unsafe_end_index {end}")
    return GuardTestRow(id=str(row.get("id", where)), messages=messages, label=SafetyLabel(row["label"]),
                        unsafe_start_index=start, unsafe_end_index=end)


def load_guardtest(path: str | Path, split: str | None = None) -> list[GuardTestRow]:
    """Rows of a Qwen3GuardTest-layout set, read offline.

    Args:
        path: a JSONL file (errors name the line), a parquet file (errors name the row), or a dataset
            directory such as a local snapshot of Qwen/Qwen3GuardTest (see `saferl.data.split_files`).
        split: for a directory, the split to read (e.g. `thinking`); optional when it holds only one.
    """
    files = data_files(path, split)
    out = [parse_guardtest_row(row, where) for f in files for where, row in read_rows(f)]
    if not out:
        raise ValueError(f"{path}: no rows (the data is empty)")
    return out
