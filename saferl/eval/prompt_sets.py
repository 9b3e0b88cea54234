"""Held-out prompt sets for `saferl eval`: JSONL, parquet or Hugging Face Hub datasets, mapped to `Prompt`s.

Sources: a `.jsonl` or `.parquet` file, or a hub dataset id (or a local dataset directory) read with
`datasets.load_dataset` (offline machines need it downloaded first). `toyworld:<part>` references are resolved
to files by the caller (`saferl.roles.resolve`).

Column mapping (`Columns`):
  prompt     a string (one user turn) or a list of {role, content} messages ending with the user's turn;
             unset: `messages` if the row has it, else `prompt` (the `saferl.data` JSONL format)
  kind       harmful | benign | controversial, per row from a column, or one `kind_value` for the whole set
  category   the harmful category (per-category safety rates); unset: `category` when the row has it
`id` and `meta` (a dict; toy-world prompts carry their ground truth there) are kept when present.
Every row is validated before any model loads; errors name the file and line (parquet and hub: the row).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from saferl.types import Prompt

KINDS: tuple[str, ...] = ("harmful", "benign", "controversial")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class Columns:
    """Which row fields hold the prompt, its kind and its category (see the module docstring)."""

    prompt: str | None = None
    kind: str = "kind"
    kind_value: str | None = None
    category: str | None = None


def _messages(value: object, column: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: column '{column}' is empty")
        return [{"role": "user", "content": value}]
    if (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        if value[-1]["role"] != "user":
            raise ValueError(f"{where}: the last message of column '{column}' must be the user's, got "
                             f"{value[-1]['role']!r}")
        if not value[-1]["content"].strip():
            raise ValueError(f"{where}: the last message of column '{column}' (the prompt) is empty")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where}: column '{column}' must be a string or a non-empty list of {{role, content}} "
                     f"messages, got {type(value).__name__}")


def _missing(column: str, row: dict, where: str, flag: str) -> ValueError:
    return ValueError(f"{where}: missing column '{column}' ({flag}); the row has {sorted(row)}")


def row_to_prompt(row: object, where: str, columns: Columns) -> Prompt:
    """One validated `Prompt` from a row; errors start with `where`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object (a row of named columns), got {type(row).__name__}")
    prompt_col = columns.prompt or ("messages" if "messages" in row else "prompt")
    if prompt_col not in row:
        raise _missing(prompt_col, row, where, "choose one with --prompt-column")
    messages = _messages(row[prompt_col], prompt_col, where)
    if columns.kind_value is not None:
        kind = columns.kind_value
    elif columns.kind not in row:
        raise _missing(columns.kind, row, where, "choose one with --kind-column, or give the whole set one "
                       "kind with --kind harmful|benign")
    else:
        kind = row[columns.kind]
    if kind not in KINDS:
        raise ValueError(f"{where}: kind {kind!r} (column '{columns.kind}') is not one of {', '.join(KINDS)}")
    category_col = columns.category or "category"
    if columns.category is not None and category_col not in row:
        raise _missing(category_col, row, where, "--category-column")
    category = row.get(category_col)
    if category is not None and not isinstance(category, str):
        raise ValueError(f"{where}: column '{category_col}' must be a string or null, got "
                         f"{type(category).__name__}")
    meta = row.get("meta")
    return Prompt(id=str(row.get("id", where)), messages=messages, kind=kind, category=category or None,
                  meta=dict(meta) if isinstance(meta, dict) else {})


def _hub_rows(ref: str, split: str) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        data = datasets.load_dataset(ref, split=split)
    except (OSError, ValueError) as e:  # offline, unknown id, missing split: say what was tried
        raise FileNotFoundError(f"{ref}: cannot load it as a Hugging Face dataset (split {split!r}): {e}. "
                                "Give a local .jsonl or .parquet file, or download the dataset where the hub "
                                "is reachable.") from e
    for i, row in enumerate(data):
        yield f"{ref} [{split}] row {i}", row


def prompt_rows(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """(where, row) for every row of a JSONL/parquet file, a local dataset directory or a hub dataset."""
    from saferl.guard.gen import read_rows

    path = Path(source)
    if path.is_file():
        if path.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"{source}: expected a .jsonl or .parquet file")
        return read_rows(path)
    if path.is_dir() or (HUB_ID.match(source) and path.suffix not in (".jsonl", ".parquet")):
        return _hub_rows(source, split)
    raise FileNotFoundError(f"Prompt set not found: {source} (a .jsonl or .parquet file, toyworld:heldout, or "
                            "a Hugging Face dataset id)")


def load_prompt_set(source: str, columns: Columns, split: str = "train") -> list[Prompt]:
    """Every prompt of `source` (see `prompt_rows`) under the column mapping; empty sets are an error."""
    if columns.kind_value is not None and columns.kind_value not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {columns.kind_value!r}")
    prompts = [row_to_prompt(row, where, columns) for where, row in prompt_rows(source, split)]
    if not prompts:
        raise ValueError(f"{source}: no prompts (the set is empty)")
    return prompts


def subsample(prompts: list[Prompt], n: int) -> list[Prompt]:
    """`n` prompts at an even stride (every kind of a sorted set stays represented), or all when n is 0 or
    at least their number; the same selection as training's `eval.max_prompts`."""
    if n < 0:
        raise ValueError(f"the number of prompts to keep must be at least 0 (0 = all), got {n}")
    if not n or len(prompts) <= n:
        return prompts
    stride = len(prompts) / n
    return [prompts[int(i * stride)] for i in range(n)]
