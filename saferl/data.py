"""Prompt sets, read one way for training and evaluation, and the sampler that yields a batch per step.

`load_prompts` is the one loader: training's `data.train` and `eval.prompts`, `saferl eval --prompts` and
`saferl chat --eval` all read through it. Sources: a `.jsonl` file (errors name `file:line`), a `.parquet`
file (`file row i`), a local dataset directory (one written by `datasets.Dataset.save_to_disk`, read with
`datasets.load_from_disk`: `dir row i`; or a directory of .jsonl/.parquet files, one set per split, named as
on the Hub: `file:line` / `file row i`), or a Hugging Face dataset id read with `datasets.load_dataset`
(offline machines need it downloaded first; `id [split] row i`). `toyworld:<part>` references are resolved
to paths before they get here (`saferl.references`).

Column mapping (`Columns`; `saferl eval --prompt-column ...`, `data.prompt_column ...` in a config):
  prompt     a string (one user turn) or a list of {role, content} messages ending with the user's turn;
             unset: `messages` if the row has it, else `prompt` (the format `write_prompts` writes)
  kind       harmful | benign | controversial, per row from a column, or one `kind_value` for the whole set;
             evaluation needs it (its metrics split by kind), training reads it when present (else unknown)
  category   the harmful category (per-category safety rates); unset: `category` when the row has it
`id` and `meta` (a dict; toy-world prompts carry their ground truth there) are kept when present. Every row
is validated before any model loads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saferl.types import Prompt

KINDS: tuple[str, ...] = ("harmful", "benign", "controversial")
DATA_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class Columns:
    """Which row fields hold the prompt, its kind and its category (see the module docstring)."""

    prompt: str | None = None
    kind: str = "kind"
    kind_value: str | None = None
    category: str | None = None


def write_prompts(path: str | Path, prompts: list[Prompt]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "messages": p.messages, "kind": p.kind, "category": p.category,
                                "meta": p.meta}) + "\n")


def read_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """(`file:line`, parsed object) for each non-blank line; a missing file, bad UTF-8 or bad JSON names the
    file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"File not found: {path}")
    with open(path, "rb") as f:  # decoded line by line: a text-mode read would fail without the line number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at position "
                                 f"{e.start + 1} of the line)") from e
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    """(`file row i`, row) of a parquet file, read with pyarrow (a `datasets` dependency)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:  # not parquet, truncated, ...: pyarrow's message does not name the file
        raise ValueError(f"{path}: cannot read it as parquet ({e})") from e
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} {_first_bad_utf8(table)}: not valid UTF-8 ({e.reason})") from e
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def _first_bad_utf8(table: Any) -> str:
    """`row i, column 'c'` of the first string cell that is not valid UTF-8 (the error path only: slow)."""
    bad = []
    for name in table.column_names:
        for i, cell in enumerate(table.column(name)):
            try:
                cell.as_py()
            except UnicodeDecodeError:
                bad.append((i, name))
                break
    i, name = min(bad)
    return f"row {i}, column '{name}'"


def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) of a JSONL (`file:line`) or parquet (`file row i`) file, by its suffix."""
    return _read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)


def split_files(root: str | Path) -> dict[str, list[Path]]:
    """The data files under a dataset directory by split, named as on the Hugging Face Hub.

    A file's split is its stem up to the first '-': `thinking.jsonl` and
    `data/thinking-00000-of-00001.parquet` both belong to `thinking`. Hidden folders (`.cache`, `.git`) are
    skipped.
    """
    out: dict[str, list[Path]] = {}
    for f in sorted(Path(root).rglob("*")):
        hidden = any(part.startswith(".") for part in f.relative_to(root).parts)
        if f.is_file() and f.suffix in DATA_SUFFIXES and not hidden:
            out.setdefault(f.stem.split("-", 1)[0], []).append(f)
    return out


def data_files(path: str | Path, split: str | None = None) -> list[Path]:
    """The .jsonl/.parquet files of `path`: the file itself, or a directory's files of `split` (optional when
    it holds only one split, see `split_files`)."""
    p = Path(path)
    if p.is_dir():
        splits = split_files(p)
        if not splits:
            raise ValueError(f"{path}: no {'/'.join(DATA_SUFFIXES)} files in this directory")
        if split is None and len(splits) > 1:
            raise ValueError(f"{path}: has splits {sorted(splits)}; choose one with --split")
        split = split if split is not None else next(iter(splits))
        if split not in splits:
            raise ValueError(f"{path}: no split {split!r}; available: {sorted(splits)}")
        return splits[split]
    if p.is_file():
        if p.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{path}: expected a {' or '.join(DATA_SUFFIXES)} file or a dataset directory")
        return [p]
    raise FileNotFoundError(f"Data not found: {path} (expected a JSONL or parquet file, or a dataset "
                            "directory; download a hub dataset first)")


def _saved_rows(path: Path, split: str | None) -> Iterator[tuple[str, object]]:
    """(`dir row i`, row) of a dataset directory written by `save_to_disk` (a Dataset, or a DatasetDict's
    `split`, optional when it holds one)."""
    import datasets

    data = datasets.load_from_disk(str(path))
    where = str(path)
    if isinstance(data, datasets.DatasetDict):
        names = sorted(data)
        if split is None and len(names) > 1:
            raise ValueError(f"{path}: has splits {names}; choose one with --split")
        split = split if split is not None else names[0]
        if split not in data:
            raise ValueError(f"{path}: no split {split!r}; available: {names}")
        data, where = data[split], f"{path} [{split}]"
    for i, row in enumerate(data):
        yield f"{where} row {i}", row


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


def prompt_rows(source: str | Path, split: str | None = None) -> Iterator[tuple[str, object]]:
    """(where, row) for every row of a JSONL/parquet file, a local dataset directory or a hub dataset
    (`split` default: train; a directory's only split)."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{source}: expected a .jsonl or .parquet file")
        return read_rows(path)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # save_to_disk's layout
            return _saved_rows(path, split)
        return (item for f in data_files(path, split) for item in read_rows(f))
    if HUB_ID.match(str(source)) and path.suffix not in DATA_SUFFIXES:
        return _hub_rows(str(source), split or "train")
    raise FileNotFoundError(f"Prompt set not found: {source} (a .jsonl or .parquet file, a dataset "
                            "directory, toyworld:heldout, or a Hugging Face dataset id)")


def _messages(value: object, column: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():  # the policy would answer nothing
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


def check_messages(messages: object, where: str, field: str) -> list[dict[str, str]]:
    """`messages` as a list of {role, content} string pairs (any extra keys dropped); a ValueError starting
    with `where` names `field` when it is anything else or empty."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects with "
                         "string values")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _missing(column: str, row: dict, where: str, flag: str) -> ValueError:
    return ValueError(f"{where}: missing column '{column}' ({flag}); the row has {sorted(row)}")


def row_to_prompt(row: object, where: str, columns: Columns, require_kind: bool = False) -> Prompt:
    """One validated `Prompt` from a row; errors start with `where`. Without `require_kind` a row lacking the
    kind column is of kind `unknown`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object (a row of named columns), got {type(row).__name__}")
    prompt_col = columns.prompt or ("messages" if "messages" in row else "prompt")
    if prompt_col not in row:
        raise _missing(prompt_col, row, where, "choose one with --prompt-column, or data.prompt_column")
    messages = _messages(row[prompt_col], prompt_col, where)
    allowed = KINDS if require_kind else (*KINDS, "unknown")
    if columns.kind_value is not None:
        kind = columns.kind_value
    elif columns.kind in row:
        kind = row[columns.kind]
    elif require_kind:
        raise _missing(columns.kind, row, where, "choose one with --kind-column, or give the whole set one "
                       "kind with --kind harmful|benign")
    else:
        kind = "unknown"
    if kind not in allowed:
        raise ValueError(f"{where}: kind {kind!r} (column '{columns.kind}') is not one of "
                         f"{', '.join(allowed)}")
    category_col = columns.category or "category"
    if columns.category is not None and category_col not in row:
        raise _missing(category_col, row, where, "--category-column, or data.category_column")
    category = row.get(category_col)
    if category is not None and not isinstance(category, str):
        raise ValueError(f"{where}: column '{category_col}' must be a string or null, got "
                         f"{type(category).__name__}")
    meta = row.get("meta")
    return Prompt(id=str(row.get("id", where)), messages=messages, kind=kind, category=category or None,
                  meta=dict(meta) if isinstance(meta, dict) else {})


def load_prompts(source: str | Path, columns: Columns = Columns(), split: str | None = None, *,
                 require_kind: bool = False) -> list[Prompt]:
    """Every prompt of `source` (see `prompt_rows`) under the column mapping; a missing, empty or malformed
    set raises an error naming it (and the file and line or row). Evaluation passes `require_kind`."""
    if columns.kind_value is not None and columns.kind_value not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {columns.kind_value!r}")
    prompts = [row_to_prompt(row, where, columns, require_kind) for where, row in prompt_rows(source, split)]
    if not prompts:
        raise ValueError(f"{source}: no prompts (the set is empty)")
    return prompts


def subsample(prompts: list[Prompt], n: int) -> list[Prompt]:
    """`n` prompts at an even stride (every kind of a sorted set stays represented), or all when n is 0 or
    at least their number; the selection of `saferl eval --max-prompts` and training's `eval.max_prompts`."""
    if n < 0:
        raise ValueError(f"the number of prompts to keep must be at least 0 (0 = all), got {n}")
    if not n or len(prompts) <= n:
        return prompts
    stride = len(prompts) / n
    return [prompts[int(i * stride)] for i in range(n)]


class PromptSampler:
    """Shuffled epochs over a prompt set; `next_batch(n)` never repeats a prompt within an epoch.

    State is (epoch, position), so a resumed run continues with exactly the prompts it would have seen.
    """

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("the training prompt set is empty")
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state_dict()` was taken; at an epoch's end the next batch starts the next epoch."""
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch
