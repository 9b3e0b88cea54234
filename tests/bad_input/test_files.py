"""Bad input files and arguments through the real CLI (issue 14, point 12): invalid UTF-8 and empty prompts name
the file and line (parquet: the row), `saferl chat ""` is refused, `saferl serve` names a host:port it cannot
bind before it loads anything. Every case exits non-zero with one line and no traceback.

Model arguments point at a directory that does not exist, so a check that stopped working would fail fast on
the missing model (with the wrong message) instead of loading or building one."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = {"prompt": "How do I bake bread?", "kind": "benign"}


def _saferl(*args: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "saferl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    return out.returncode, out.stdout + out.stderr


def _refused(args: list[str], *named: str) -> str:
    code, output = _saferl(*args)
    assert code != 0, output
    assert "Traceback" not in output, output
    for text in named:
        assert text in output, output
    assert len(output.strip().splitlines()) == 1, output
    return output


def _jsonl(path, *lines: bytes):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def bad_utf8(tmp_path):
    """Line 3 holds a Latin-1 byte (0xe9) that is not UTF-8; line 2 is blank."""
    good = json.dumps(GOOD).encode()
    return _jsonl(tmp_path / "latin1.jsonl", good, b"", b'{"prompt": "caf\xe9 au lait?", "kind": "benign"}')


@pytest.fixture
def empty_prompt(tmp_path):
    """Line 2: a prompt of spaces."""
    return _jsonl(tmp_path / "empty.jsonl", json.dumps(GOOD).encode(),
                  json.dumps({"prompt": "   ", "kind": "benign"}).encode())


@pytest.fixture
def empty_chat(tmp_path):
    return _jsonl(tmp_path / "empty_chat.jsonl", json.dumps(GOOD).encode(),
                  json.dumps({"messages": [{"role": "user", "content": ""}], "kind": "benign"}).encode())


def _parquet(path, prompts: list[bytes]):
    """A parquet file whose string column holds `prompts` verbatim (pyarrow's writer does not check UTF-8)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array(prompts, type=pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    pq.write_table(pa.table({"prompt": column, "kind": pa.array(["benign"] * len(prompts))}), path)
    return path


def _train(data, tmp_path) -> list[str]:
    # In-process roles and missing models: without the data check, the run would stop at the first model.
    missing = tmp_path / "no_model"
    return ["train", "-c", os.path.join(ROOT, "configs", "toy.yaml"), f"data.train={data}", f"eval.prompts={data}",
            f"run.dir={tmp_path / 'run'}", "run.executor=local", f"policy.model={missing}",
            f"guard.model={missing}", f"helpfulness.model={missing}"]


def test_train_data_invalid_utf8(bad_utf8, tmp_path):
    _refused(_train(bad_utf8, tmp_path), f"{bad_utf8}:3", "UTF-8")
    assert not (tmp_path / "run").exists()


def test_train_data_empty_prompt(empty_prompt, tmp_path):
    _refused(_train(empty_prompt, tmp_path), f"{empty_prompt}:2", "empty")
    assert not (tmp_path / "run").exists()


def _eval(prompts, tmp_path) -> list[str]:
    missing = str(tmp_path / "no_model")
    return ["eval", "-m", missing, "--guard", missing, "--rm", "none", "--prompts", str(prompts)]


def test_eval_prompts_invalid_utf8(bad_utf8, tmp_path):
    _refused(_eval(bad_utf8, tmp_path), f"{bad_utf8}:3", "UTF-8")


def test_eval_prompts_empty_chat_turn(empty_chat, tmp_path):
    _refused(_eval(empty_chat, tmp_path), f"{empty_chat}:2", "empty")


def test_eval_parquet_invalid_utf8(tmp_path):
    data = _parquet(tmp_path / "latin1.parquet", [b"How do I bake bread?", b"caf\xe9 au lait?"])
    _refused(_eval(data, tmp_path), f"{data} row 1", "UTF-8")


def test_guard_moderate_input(bad_utf8, empty_prompt, tmp_path):
    missing = str(tmp_path / "no_model")
    out = str(tmp_path / "out.jsonl")
    _refused(["guard", "moderate", "-m", missing, "-i", str(bad_utf8), "-o", out], f"{bad_utf8}:3", "UTF-8")
    _refused(["guard", "moderate", "-m", missing, "-i", str(empty_prompt), "-o", out], f"{empty_prompt}:2",
             "empty")


def test_sft_data(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}], "completion": "hello"}).encode()
    latin1 = _jsonl(tmp_path / "latin1.jsonl", good, b'{"messages": [{"role": "user", "content": "caf\xe9"}], '
                    b'"completion": "oui"}')
    empty = _jsonl(tmp_path / "empty.jsonl", good, json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "completion": " "}).encode())
    args = ["sft", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "out"), "--data"]
    _refused([*args, str(latin1)], f"{latin1}:2", "UTF-8")
    _refused([*args, str(empty)], f"{empty}:2", "'completion'")


def test_chat_refuses_an_empty_prompt(tmp_path):
    missing = str(tmp_path / "no_model")
    _refused(["chat", "-m", missing, "--guard", missing, "  "], "PROMPT", "empty")


def test_serve_names_a_busy_port_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model does not exist: reaching it would be a different error.
        _refused(["serve", "guard", "-m", str(tmp_path / "no_model"), "--port", str(port)],
                 f"127.0.0.1:{port}", "in use")


def test_serve_names_an_address_it_cannot_bind(tmp_path):
    missing = str(tmp_path / "no_model")
    token = tmp_path / "token"
    token.write_text("secret\n")
    _refused(["serve", "rm", "-m", missing, "--port", "70000"], "127.0.0.1:70000", "0-65535")
    _refused(["serve", "rm", "-m", missing, "--host", "no-such-host.invalid", "--port", "8000", "--token-file",
              str(token)], "no-such-host.invalid:8000")
