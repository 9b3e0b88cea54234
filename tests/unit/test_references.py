"""`toyworld:<part>` references are resolved by one function, `saferl.references.resolve_reference`, for every
command (issue 15, point 4): each CLI path below reaches it with its reference before loading anything."""

import json
import sys

import pytest

from saferl import references
from saferl.cli import main
from saferl.config import ToyWorldConfig
from saferl.references import resolve_reference


def test_parts_resolve_to_the_worlds_paths_without_building(tmp_path):
    from saferl.toyworld.build import toyworld_paths

    cfg = ToyWorldConfig(cache_dir=str(tmp_path / "cache"))
    root = toyworld_paths(cfg).root
    assert resolve_reference("toyworld:policy", cfg, build=False) == str(root / "policy")
    assert resolve_reference("toyworld:train", cfg, build=False) == str(root / "train.jsonl")
    assert resolve_reference("Qwen/Qwen3-4B", cfg) == "Qwen/Qwen3-4B"
    assert resolve_reference("runs/x/checkpoints/final", cfg) == "runs/x/checkpoints/final"
    assert not (tmp_path / "cache").exists()  # build=False builds nothing
    # The Stream parts and an unknown part: tests/integration/test_stream_toy.py (they import torch).


class Resolved(ValueError):
    pass


@pytest.fixture
def recorder(monkeypatch):
    """Every binding of the one resolver replaced by one that records the reference and stops the command
    (a ValueError: the CLI prints it and exits 2). A command with its own resolver would never reach it."""
    seen: list[str] = []
    import saferl.toyworld.build

    def elsewhere(*args, **kwargs):
        raise AssertionError("the toy world was located outside saferl.references")

    for name in ("ensure_built", "toyworld_paths"):  # a second resolver fails fast instead of building
        monkeypatch.setattr(saferl.toyworld.build, name, elsewhere)

    def fake(ref, toyworld=None, *, build=True):
        seen.append(ref)
        raise Resolved(f"resolved {ref}")

    one = references.resolve_reference
    for name, module in list(sys.modules.items()):  # getattr on other packages' lazy modules imports them
        if name.split(".")[0] in ("saferl", "rewards") and getattr(module, "resolve_reference", None) is one:
            monkeypatch.setattr(module, "resolve_reference", fake)
    return seen


def _write(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_command_resolves_through_the_one_function(recorder, tmp_path, capsys):
    records = _write(tmp_path / "r.jsonl", {"prompt": "hi"})
    sft = _write(tmp_path / "sft.jsonl", {"messages": [{"role": "user", "content": "hi"}], "completion": "ok"})
    out = str(tmp_path / "out")
    commands = {
        "train": (["train", f"run.dir={out}", "run.executor=local"], "toyworld:train"),
        "train --dry-run": (["train", "--dry-run"], "toyworld:policy"),
        "eval": (["eval", "-m", "toyworld:policy", "--rm", "none"], "toyworld:heldout"),
        "serve": (["serve", "guard", "-m", "toyworld:guard", "--port", "0"], "toyworld:guard"),
        "guard moderate": (["guard", "moderate", "-m", "toyworld:guard", "-i", records, "-o", out],
                           "toyworld:guard"),
        "guard eval": (["guard", "eval", "--kind", "stream", "-m", "toyworld:stream_guard", "-d",
                        "toyworld:stream_heldout", "-o", out], "toyworld:stream_heldout"),
        "guard train-stream": (["guard", "train-stream", "--backbone", "toyworld:guard", "--data",
                                "toyworld:stream_heldout", "-o", out], "toyworld:stream_heldout"),
        "chat": (["chat", "-m", "toyworld:policy", "hello"], "toyworld:stream_guard"),
        "chat --eval": (["chat", "--eval", "toyworld:heldout"], "toyworld:heldout"),
        "sft": (["sft", "--model", "toyworld:policy", "--data", sft, "--out", out], "toyworld:policy"),
    }
    for name, (argv, first) in commands.items():
        recorder.clear()
        assert main(argv) == 2, name
        assert recorder == [first], name
        assert f"saferl: error: resolved {first}" in capsys.readouterr().err, name
