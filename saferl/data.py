"""Prompt sets: JSONL files of chat prompts, and the sampler that yields a batch of them per step.

One row per line: `{"id": str, "messages": [{"role", "content"}, ...], "kind": str, "category": str|null,
"meta": {...}}`; a row may give `"prompt": str` instead of `messages`. `kind` (benign | harmful |
controversial) drives the evaluation split. Errors name the file and the line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from saferl.types import Prompt


def write_prompts(path: str | Path, prompts: list[Prompt]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "messages": p.messages, "kind": p.kind, "category": p.category,
                                "meta": p.meta}) + "\n")


def _row_to_prompt(row: object, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the last message must be the user's, got {messages[-1]['role']!r}")
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise ValueError(f"{where}: missing field 'messages' (or a string 'prompt')")
    text = messages[-1]["content"]
    if not isinstance(text, str) or not text.strip():  # the policy would answer nothing
        field = "the last message of 'messages'" if "messages" in row else "'prompt'"
        raise ValueError(f"{where}: the prompt is empty ({field}: {text!r})")
    return Prompt(id=str(row.get("id", where)), messages=messages, kind=str(row.get("kind", "unknown")),
                  category=row.get("category"), meta=dict(row.get("meta") or {}))


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


def check_messages(messages: object, where: str, field: str) -> list[dict[str, str]]:
    """`messages` as a list of {role, content} string pairs (any extra keys dropped); a ValueError starting
    with `where` names `field` when it is anything else or empty."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects with "
                         "string values")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_prompts(path: str | Path) -> list[Prompt]:
    """All prompts of a JSONL file; a missing, empty or malformed file raises an error naming it."""
    prompts = [_row_to_prompt(row, where) for where, row in read_jsonl(path)]
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts


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
