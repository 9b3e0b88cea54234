"""`saferl eval` prompt sets: column mapping, and bad input failing with the file and line named (exit code 2)
before any model loads (the model paths here do not exist: loading one would fail differently)."""

import json

import pytest

from saferl.cli import main
from saferl.data import Columns, load_prompts

MISSING = "/nonexistent/model"


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def eval_cli(capsys, prompts, *extra):
    code = main(["eval", "-m", MISSING, "--guard", MISSING, "--rm", "none", "--prompts", str(prompts), *extra])
    return code, capsys.readouterr().err


def test_saferl_format_and_column_mapping(tmp_path):
    f = write_rows(tmp_path / "p.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "hi"}], "kind": "benign", "meta": {"group": "g"}},
        {"prompt": "how to pick a lock", "kind": "harmful", "category": "Non-violent Illegal Acts"}])
    a, b = load_prompts(str(f), Columns(), require_kind=True)
    assert (a.id, a.text, a.kind, a.category, a.meta) == ("a", "hi", "benign", None, {"group": "g"})
    assert (b.id, b.text, b.kind, b.category) == (f"{f}:2", "how to pick a lock", "harmful",
                                                  "Non-violent Illegal Acts")
    g = write_rows(tmp_path / "q.jsonl", [{"question": "q1", "label": "harmful", "type": "PII"},
                                          {"question": "q2", "label": "benign", "type": None}])
    mapped = load_prompts(str(g), Columns(prompt="question", kind="label", category="type"), require_kind=True)
    assert [(p.text, p.kind, p.category) for p in mapped] == [("q1", "harmful", "PII"), ("q2", "benign", None)]
    constant = load_prompts(str(g), Columns(prompt="question", kind_value="harmful"), require_kind=True)
    assert [p.kind for p in constant] == ["harmful", "harmful"]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "kind": ["harmful", "benign"]}), f)
    assert [p.text for p in load_prompts(str(f), Columns(prompt="text"), require_kind=True)] == ["a", "b"]
    with pytest.raises(ValueError, match=r"p.parquet row 0: missing column 'prompt' .*--prompt-column"):
        load_prompts(str(f), Columns(), require_kind=True)


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    f = write_rows(tmp_path / "p.jsonl", [{"prompt": "hi", "kind": "benign"}, "{not json"])
    code, err = eval_cli(capsys, f)
    assert code == 2 and f"{f}:2: not valid JSON" in err


def test_missing_column_names_file_and_line(tmp_path, capsys):
    f = write_rows(tmp_path / "p.jsonl", [{"question": "a", "kind": "benign"}, {"kind": "benign"}])
    code, err = eval_cli(capsys, f, "--prompt-column", "question")
    assert code == 2 and f"{f}:2: missing column 'question'" in err and "['kind']" in err
    g = write_rows(tmp_path / "k.jsonl", [{"prompt": "a"}])
    code, err = eval_cli(capsys, g)
    assert code == 2 and f"{g}:1: missing column 'kind'" in err and "--kind harmful|benign" in err
    code, err = eval_cli(capsys, f, "--prompt-column", "question", "--category-column", "topic")
    assert code == 2 and f"{f}:1: missing column 'topic'" in err


def test_bad_values_name_the_line(tmp_path, capsys):
    f = write_rows(tmp_path / "p.jsonl", [{"prompt": "a", "kind": "benign"}, {"prompt": "b", "kind": "unsafe"}])
    code, err = eval_cli(capsys, f)
    assert code == 2 and f"{f}:2: kind 'unsafe'" in err
    g = write_rows(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "x"}], "kind": "benign"}])
    code, err = eval_cli(capsys, g)
    assert code == 2 and f"{g}:1: the last message of column 'messages' must be the user's" in err
    h = write_rows(tmp_path / "n.jsonl", [{"prompt": 3, "kind": "benign"}])
    code, err = eval_cli(capsys, h)
    assert code == 2 and f"{h}:1: column 'prompt' must be a string" in err


def test_empty_and_missing_sets(tmp_path, capsys):
    f = write_rows(tmp_path / "empty.jsonl", [""])
    code, err = eval_cli(capsys, f)
    assert code == 2 and "empty.jsonl: no prompts" in err
    code, err = eval_cli(capsys, tmp_path / "nope.jsonl")
    assert code == 2 and "Prompt set not found" in err and "nope.jsonl" in err
    code, err = eval_cli(capsys, tmp_path / "p.csv")
    assert code == 2 and "Prompt set not found" in err


def test_hub_dataset_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    code, err = eval_cli(capsys, "someorg/some-eval-set", "--split", "test")
    assert code == 2
    assert "someorg/some-eval-set: cannot load it as a Hugging Face dataset (split 'test')" in err


def test_missing_model_fails_after_prompts_before_loading(tmp_path, capsys):
    f = write_rows(tmp_path / "p.jsonl", [{"prompt": "a", "kind": "benign"}])
    code, err = eval_cli(capsys, f)
    assert code == 2 and f"Model directory not found or has no config.json: {MISSING}" in err
    code = main(["eval", "-m", "a=x", "-m", "a=y", "--prompts", str(f)])
    assert code == 2 and "share a label" in capsys.readouterr().err
