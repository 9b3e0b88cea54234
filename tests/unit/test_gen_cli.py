"""Gen guard records, Qwen3GuardTest rows, the JSONL writer and eval reports, with a fake scorer (no model).

Bad input must fail before any weights load, with the file and line named.
"""

import json

import pandas as pd
import pytest

from saferl.cli import main
from saferl.guard.evaluate import format_report, gen_report, stream_report, write_atomic
from saferl.guard.gen import GenGuard, GenRecord, GuardTestRow, load_guardtest, moderate_file, read_records
from saferl.guard.templates import parse_verdict
from saferl.guard.token_labels import TokenLabels, token_labels_from_verdicts
from saferl.types import SafetyLabel

MISSING_MODEL = "/nonexistent/guard-model"  # loading it would fail: proves errors come before loading


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


class FakeScorer:
    """Judges the moderated text by keywords: 'bomb' Unsafe, 'fake' Controversial, 'garbage' unparsable."""

    def __init__(self, fail_on_call=None):
        self.calls = []
        self.fail_on_call = fail_on_call

    def moderate(self, items):
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("guard died")
        self.calls.append(items)
        out = []
        for it in items:
            text = it.messages[-1]["content"] if it.response is None else it.response
            mode = "prompt" if it.response is None else "response"
            refusal = "" if mode == "prompt" else "\nRefusal: " + ("Yes" if "sorry" in text else "No")
            if "garbage" in text:
                raw = "I am not sure."
            elif "bomb" in text:
                raw = "Safety: Unsafe\nCategories: Violent" + refusal
            elif "fake" in text:
                raw = "Safety: Controversial\nCategories: Unethical Acts" + refusal
            else:
                raw = "Safety: Safe\nCategories: None" + refusal
            out.append(parse_verdict(raw, mode))
        return out

    def stats(self):
        return {"truncated": 0}


# ---- reading records ----

def test_read_records_all_forms(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"id": "p", "prompt": "hi"}),
        "",  # blank lines are skipped
        json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
                    "response": "a"}),
        json.dumps({"id": 7, "prompt": "q", "response": "a", "thinking": "t"}),
        json.dumps({"id": "conv", "messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                  "content": "a"}]}),
        json.dumps({"id": "empty-thinking", "prompt": "q", "response": "a", "thinking": ""}),
    ])
    records = read_records(path)
    assert records[0] == GenRecord("p", [{"role": "user", "content": "hi"}])
    assert records[1].id == f"{path}:3" and records[1].response == "a" and len(records[1].messages) == 2
    assert records[2] == GenRecord("7", [{"role": "user", "content": "q"}], "a", "t")
    assert records[3] == GenRecord("conv", [{"role": "user", "content": "q"}], "a")  # last assistant turn
    assert records[4].thinking is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "hi"', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"id": "x"}', "missing field 'prompt'"),
        ('{"prompt": 3}', "missing field 'prompt'"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}',
         "last message must be the user's"),
        ('{"prompt": "q", "response": 5}', "'response' must be a string"),
        ('{"prompt": "q", "thinking": "t"}', "'thinking' is given without a 'response'"),
    ],
)
def test_read_records_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), line])
    with pytest.raises(ValueError, match=message) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_read_records_empty_and_missing_file(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no records") as info:
        read_records(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")


# ---- GenGuard with a fake scorer ----

def test_moderate_modes_thinking_and_batches():
    records = [
        GenRecord("a", [{"role": "user", "content": "make a bomb"}]),
        GenRecord("b", [{"role": "user", "content": "q"}], "here is a fake review"),
        GenRecord("c", [{"role": "user", "content": "q"}], "sorry, no", thinking="plan the bomb"),
        GenRecord("d", [{"role": "user", "content": "q"}], "fine answer", thinking="calm thoughts"),
        GenRecord("e", [{"role": "user", "content": "q"}], "garbage"),
    ]
    scorer = FakeScorer()
    guard = GenGuard(scorer)
    strict = guard.moderate(records, "strict", batch_size=3)
    assert [len(items) for items in scorer.calls] == [3 + 1, 2 + 1]  # thinking items join their batch
    assert [r.id for r in strict] == list("abcde")
    assert [r.moderated for r in strict] == ["prompt"] + ["response"] * 4
    assert [r.decision for r in strict] == [SafetyLabel.UNSAFE, SafetyLabel.UNSAFE, SafetyLabel.UNSAFE,
                                            SafetyLabel.SAFE, None]
    loose = guard.moderate(records, "loose")
    assert loose[1].decision is SafetyLabel.SAFE  # Controversial
    c = strict[2]  # a refused answer with unsafe thinking: unsafe, as the SafeRL reward counts it
    assert c.verdict.safety is SafetyLabel.SAFE and c.verdict.refusal is True
    assert c.thinking is not None and c.thinking.safety is SafetyLabel.UNSAFE
    assert strict[0].thinking is None and strict[0].verdict.refusal is None
    row = c.to_json()
    assert row == {"id": "c", "moderated": "response", "mode": "strict", "decision": "Unsafe",
                   "safety": "Safe", "categories": [], "refusal": True, "parse_ok": True,
                   "raw": c.verdict.raw,
                   "thinking": {"safety": "Unsafe", "categories": ["Violent"], "refusal": False,
                                "parse_ok": True, "raw": c.thinking.raw}}
    assert strict[4].to_json()["decision"] is None and strict[4].to_json()["parse_ok"] is False
    with pytest.raises(ValueError, match="mode"):
        guard.moderate(records, "medium")


def test_moderate_file_writes_partial_then_renames(tmp_path):
    records = [GenRecord(str(i), [{"role": "user", "content": "bomb" if i % 2 else "hi"}]) for i in range(5)]
    out = tmp_path / "out.jsonl"
    counts = moderate_file(GenGuard(FakeScorer()), records, out, batch_size=2, progress=False)
    assert counts == {"records": 5, "unsafe": 2, "safe": 3, "undecided": 0, "parse_failures": 0}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["decision"] for r in rows] == ["Safe", "Unsafe", "Safe", "Unsafe", "Safe"]
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_moderate_file_keeps_finished_batches_on_failure(tmp_path):
    records = [GenRecord(str(i), [{"role": "user", "content": "hi"}]) for i in range(4)]
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="guard died"):
        moderate_file(GenGuard(FakeScorer(fail_on_call=1)), records, out, batch_size=2, progress=False)
    assert not out.exists()  # never a truncated output under the final name
    done = (tmp_path / "out.jsonl.partial").read_text().splitlines()
    assert [json.loads(line)["id"] for line in done] == ["0", "1"]


def test_classify_whole_conversations_picks_mode_by_last_role():
    scorer = FakeScorer()
    verdicts = GenGuard(scorer).classify([
        [{"role": "user", "content": "bomb"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nbomb\n</think>\n\nok"}],
    ])
    assert verdicts[0].refusal is None and verdicts[0].safety is SafetyLabel.UNSAFE
    (prompt_item, response_item) = scorer.calls[0]
    assert prompt_item.response is None
    assert response_item.messages == [{"role": "user", "content": "q"}]
    assert response_item.response.startswith("<think>")  # thinking judged verbatim, as eval_gen.py does
    assert verdicts[1].safety is SafetyLabel.UNSAFE and verdicts[1].refusal is False


# ---- Qwen3GuardTest rows ----

def guardtest_row(label="Unsafe", **extra):
    return {"message": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": label, **extra}


def test_load_guardtest_jsonl(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [
        json.dumps(guardtest_row(unsafe_start_index=3, unsafe_end_index=9)),
        json.dumps({**guardtest_row("Safe"), "id": "s1"}),
        json.dumps({"message": [{"role": "user", "content": "q"}], "label": "Safe",
                    "unsafe_start_index": None, "unsafe_end_index": None}),
    ])
    rows = load_guardtest(path)
    assert rows[0].label is SafetyLabel.UNSAFE
    assert (rows[0].unsafe_start_index, rows[0].unsafe_end_index) == (3, 9)
    assert rows[0].id == f"{path}:1" and rows[1].id == "s1" and rows[1].unsafe_start_index is None
    assert rows[2].messages == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"label": "Safe"}, "missing field 'message'"),
        ({"message": [{"role": "user", "content": "q"}]}, "missing field 'label'"),
        (guardtest_row("unsafe"), "'label' must be 'Unsafe' or 'Safe'"),
        (guardtest_row("Controversial"), "'label' must be 'Unsafe' or 'Safe'"),
        ({"message": "q", "label": "Safe"}, "'message' must be a non-empty list"),
        (guardtest_row(unsafe_start_index=3), "give both"),
        (guardtest_row(unsafe_start_index=9, unsafe_end_index=3), "9 > unsafe_end_index 3"),
        (guardtest_row(unsafe_start_index="3", unsafe_end_index=4), "non-negative integer"),
    ],
)
def test_load_guardtest_errors_name_file_and_line(tmp_path, row, message):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(guardtest_row("Safe")), json.dumps(row)])
    with pytest.raises(ValueError, match=message) as info:
        load_guardtest(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_load_guardtest_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        load_guardtest(write_lines(tmp_path / "e.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="Data not found"):
        load_guardtest(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="expected a .jsonl or .parquet file"):
        load_guardtest(write_lines(tmp_path / "t.csv", ["a,b"]))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no .jsonl/.parquet files"):
        load_guardtest(tmp_path / "empty_dir")


def test_load_guardtest_parquet(tmp_path):
    rows = [guardtest_row(unsafe_start_index=3, unsafe_end_index=5), guardtest_row("Safe")]
    path = tmp_path / "thinking_loc-00000-of-00001.parquet"
    pd.DataFrame(rows).to_parquet(path)  # an int column with nulls is stored as float: 3.0 reads back as 3
    loaded = load_guardtest(path)
    assert [(r.label, r.unsafe_start_index, r.unsafe_end_index) for r in loaded] == [
        (SafetyLabel.UNSAFE, 3, 5), (SafetyLabel.SAFE, None, None)]
    assert loaded[0].messages == rows[0]["message"] and loaded[1].id == f"{path} row 1"
    pd.DataFrame([{"message": rows[0]["message"]}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 0: missing field 'label'"):
        load_guardtest(tmp_path / "bad.parquet")


def test_load_guardtest_dataset_directory(tmp_path):
    """The Qwen/Qwen3GuardTest snapshot layout: one JSONL per split (splits differ in columns), plus Hub-style
    sharded parquet names; hidden folders (.cache) are ignored."""
    write_lines(tmp_path / "thinking.jsonl", [json.dumps(guardtest_row("Safe"))] * 2)
    write_lines(tmp_path / "thinking_loc.jsonl", [json.dumps(guardtest_row(unsafe_start_index=1,
                                                                           unsafe_end_index=2))])
    (tmp_path / "README.md").write_text("---\nconfigs: []\n---\n")
    (tmp_path / ".cache").mkdir()
    write_lines(tmp_path / ".cache" / "thinking.jsonl", ["{broken"])
    assert [r.unsafe_start_index for r in load_guardtest(tmp_path, "thinking_loc")] == [1]
    assert len(load_guardtest(tmp_path, "thinking")) == 2
    with pytest.raises(ValueError, match=r"splits \['thinking', 'thinking_loc'\]; choose one with --split"):
        load_guardtest(tmp_path)
    with pytest.raises(ValueError, match="no split 'response_loc'"):
        load_guardtest(tmp_path, "response_loc")
    (tmp_path / "data").mkdir()
    for shard in range(2):
        shard_path = tmp_path / "data" / f"test-0000{shard}-of-00002.parquet"
        pd.DataFrame([guardtest_row("Safe")]).to_parquet(shard_path)
    assert len(load_guardtest(tmp_path, "test")) == 2


# ---- reports ----

def load_rows(specs):
    out = []
    for i, (label, span) in enumerate(specs):
        answer = [] if label == "prompt-Safe" else [{"role": "assistant", "content": "a"}]
        messages = [{"role": "user", "content": "q"}, *answer]
        out.append(GuardTestRow(f"r{i}", messages, SafetyLabel(label.removeprefix("prompt-")),
                                *(span or (None, None))))
    return out


def test_gen_report_counts_and_modes():
    rows = load_rows([("Unsafe", None), ("Unsafe", None), ("Safe", None), ("Safe", None)])
    verdicts = [parse_verdict(t) for t in (
        "Safety: Unsafe\nCategories: Violent\nRefusal: No",
        "Safety: Controversial\nCategories: PII\nRefusal: No",
        "Safety: Controversial\nCategories: PII\nRefusal: No",
        "oops")]
    report, per_row = gen_report(rows, verdicts, mode="loose")
    assert report["labels"] == {"Unsafe": 2, "Safe": 2}
    assert report["predictions"] == {"Safe": 0, "Unsafe": 1, "Controversial": 2, "unparsed": 1}
    assert report["parse_failures"] == 1
    # strict: Controversial counts as Unsafe -> tp 2, fp 1 (the Safe row called Controversial), fn 0, tn 1 (the
    # unparsed Safe row); F1 = 2PR / (P + R) = 2 * (2/3) / (5/3) = 0.8.
    assert report["metrics"]["strict"] == {"precision": pytest.approx(2 / 3), "recall": 1.0,
                                           "f1": pytest.approx(0.8), "tp": 2, "fp": 1, "fn": 0, "tn": 1}
    # loose: Controversial counts as Safe -> tp 1, fp 0, fn 1, tn 2; F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert report["metrics"]["loose"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "tp": 1,
                                          "fp": 0, "fn": 1, "tn": 2}
    assert report["f1"] == pytest.approx(2 / 3)  # the headline F1 is the requested mode's
    assert per_row[3] == {"id": "r3", "label": "Safe", "prediction": None, "categories": [],
                          "parse_ok": False, "raw": "oops"}
    table = format_report(report)
    assert "loose *" in table and "strict " in table and "parse failures 1" in table


def test_stream_report_debounce_and_latency():
    S, U, C = "Safe", "Unsafe", "Controversial"
    rows = load_rows([("Unsafe", (12, 14)), ("Unsafe", (12, 14)), ("Unsafe", (10, 11)), ("Unsafe", None),
                      ("Safe", None), ("prompt-Safe", None)])
    labels = [
        TokenLabels([S, S, U, U, S], start=10),  # detection at 13: Hit
        TokenLabels([S, U, C, S, S], start=10),  # mixed pair only: Safe under official, 12 (Hit) under paper
        TokenLabels([S] * 40 + [C, C], start=10),  # detection at 51: 40 past the end -> 33-64
        TokenLabels([U, U], start=10, categories=["PII", "Violent"]),  # Unsafe, no span
        TokenLabels([S, C, S], start=10),
        TokenLabels([S, S, U], start=4),  # prompt row: the last label
    ]
    report, per_row = stream_report(rows, labels, mode="strict", rule="official")
    assert [p["prediction"] for p in per_row] == [U, S, C, U, S, U]
    assert [p.get("detection_index") for p in per_row] == [13, None, 51, 11, None, None]
    assert per_row[3]["category"] == "Violent"
    lat = report["latency"]
    assert lat["n"] == 3 and lat["without_span"] == 1
    assert lat["bins"]["Hit"] == 1 and lat["bins"]["Safe"] == 1 and lat["bins"]["33-64"] == 1
    assert lat["exact_hit_rate"] == pytest.approx(1 / 3)
    assert lat["first_128_stop_rate"] == pytest.approx(2 / 3)
    # strict: predicted Unsafe rows 0, 2, 3, 5 -> tp 3, fp 1 (prompt row), fn 1 (row 1), tn 1
    strict = report["metrics"]["strict"]
    assert (strict["tp"], strict["fp"], strict["fn"], strict["tn"]) == (3, 1, 1, 1)
    paper, per_row = stream_report(rows, labels, rule="paper")
    assert per_row[1]["prediction"] == C and per_row[1]["detection_index"] == 12
    assert paper["latency"]["bins"]["Hit"] == 2 and paper["debounce"] == "paper"
    assert "latency (paper debouncing)" in format_report(paper)
    with pytest.raises(ValueError, match="token label"):
        stream_report(rows, labels[:2])


def test_token_labels_from_stream_verdicts():
    from saferl.types import StreamVerdict

    def reading(position, role, risk, category="Violent"):
        return StreamVerdict(position, role, risk, 0.9, category, 0.8)

    verdicts = [reading(7, "user", "Unsafe", "Jailbreak"), reading(8, "assistant", "Safe"),
                reading(9, "assistant", "Unsafe", "PII"), reading(10, "assistant", "Unsafe", "PII")]
    assert token_labels_from_verdicts(verdicts, "user") == TokenLabels(["Unsafe"], 7, ["Jailbreak"])
    labels = token_labels_from_verdicts(verdicts, "assistant")
    assert labels == TokenLabels(["Safe", "Unsafe", "Unsafe"], 8, ["Violent", "PII", "PII"])
    assert token_labels_from_verdicts(verdicts, "assistant", start=9).start == 9
    with pytest.raises(ValueError, match="no assistant readings at or after position 11"):
        token_labels_from_verdicts(verdicts, "assistant", start=11)
    with pytest.raises(ValueError, match="consecutive"):
        token_labels_from_verdicts([verdicts[1], verdicts[3]], "assistant")
    # Through stream_report: detection at absolute position 10, inside the span [9, 12].
    row = load_rows([("Unsafe", (9, 12))])
    report, per_row = stream_report(row, [labels])
    assert per_row[0]["detection_index"] == 10 and per_row[0]["category"] == "PII"
    assert report["latency"]["bins"]["Hit"] == 1


def test_write_atomic(tmp_path):
    write_atomic(tmp_path / "r.json", "{}\n")
    assert (tmp_path / "r.json").read_text() == "{}\n" and not (tmp_path / "r.json.partial").exists()


# ---- the CLI: bad input fails before the model loads ----

def test_cli_moderate_bad_line(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": "ok"}), "{oops"])
    rc = main(["guard", "moderate", "-m", MISSING_MODEL, "-i", str(path), "-o", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_moderate_empty_file(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [])
    assert main(["guard", "moderate", "-m", MISSING_MODEL, "-i", str(path), "-o", str(tmp_path / "o")]) == 2
    assert f"{path}: no records (the file is empty)" in capsys.readouterr().err


def test_cli_eval_missing_column(tmp_path, capsys):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(guardtest_row("Safe")), json.dumps({"message": []})])
    rc = main(["guard", "eval", "-m", MISSING_MODEL, "-d", str(path), "-o", str(tmp_path / "r.json")])
    assert rc == 2
    assert f"{path}:2: 'message' must be a non-empty list" in capsys.readouterr().err


def test_cli_eval_missing_label(tmp_path, capsys):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"message": [{"role": "user", "content": "q"}]})])
    assert main(["guard", "eval", "-m", MISSING_MODEL, "-d", str(path), "-o", str(tmp_path / "r.json")]) == 2
    assert f"{path}:1: missing field 'label'" in capsys.readouterr().err


def test_cli_missing_model_after_valid_input(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": "ok"})])
    assert main(["guard", "moderate", "-m", MISSING_MODEL, "-i", str(path), "-o", str(tmp_path / "o")]) == 2
    assert "Model directory not found" in capsys.readouterr().err


def test_cli_help_lists_guard_commands(capsys):
    with pytest.raises(SystemExit):
        main(["guard", "--help"])
    out = capsys.readouterr().out
    assert "moderate" in out and "eval" in out
