"""`saferl guard eval`: score a guard on a Qwen3GuardTest-layout set, as the official eval scripts do.

Owns the report: P/R/F1 of the Unsafe class under both strict and loose mappings, each printed under its own
name (the official eval_stream.py printout swaps them, spec/qwen3guard.md §4), prediction counts, and for
Stream guards the first-detection latency bins. The metric maths lives in `decisions.py`.

Two guard kinds plug in:
- Gen (implemented): `GenGuard.classify` judges each whole conversation; the Safety line is the prediction
  (a failed parse predicts nothing, which counts as not Unsafe, and is counted).
- Stream: anything with `token_labels(conversations) -> list[TokenLabels]` (the `TokenLabeler` Protocol;
  `stream_eval.StreamLabeler` for Qwen3Guard-Stream checkpoints, imported only when one is evaluated;
  `token_labels.token_labels_from_verdicts` builds TokenLabels from stream.py's StreamVerdicts). A response
  row's labels are debounced (`official` or `paper` rule) into a prediction and a detection index, which is
  binned against the annotated span; a prompt row's prediction is its last label (the query head at the user's `<|im_end|>`).

Model and data references (`toyworld:<part>` among them) become paths through the `resolve` the caller hands
in (`saferl.references.resolve_reference` from the CLI).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saferl.guard.decisions import (
    DEBOUNCE_RULES,
    LATENCY_BINS,
    MODES,
    debounce,
    latency_bin,
    prf_by_mode,
    summarize_latency,
)
from saferl.guard.gen import GuardTestRow, load_guardtest
from saferl.guard.token_labels import TokenLabeler, TokenLabels
from saferl.types import GuardVerdict, SafetyLabel

if TYPE_CHECKING:
    from saferl.guard.gen import GenGuard

KINDS: tuple[str, ...] = ("gen", "stream")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def _label_counts(rows: Sequence[GuardTestRow]) -> dict[str, int]:
    counts = Counter(r.label.value for r in rows)
    return {"Unsafe": counts["Unsafe"], "Safe": counts["Safe"]}


def _prediction_counts(predictions: Sequence[SafetyLabel | None]) -> dict[str, int]:
    counts = Counter(p.value if p is not None else "unparsed" for p in predictions)
    return {name: counts[name] for name in (*(label.value for label in SafetyLabel), "unparsed")}


def _scores(rows: Sequence[GuardTestRow], predictions: Sequence[SafetyLabel | None],
            mode: str) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    metrics = prf_by_mode(predictions, [r.label for r in rows])
    return {"n": len(rows), "labels": _label_counts(rows), "predictions": _prediction_counts(predictions),
            "mode": mode, "f1": metrics[mode].f1, "metrics": {m: asdict(prf) for m, prf in metrics.items()}}


def gen_report(rows: Sequence[GuardTestRow], verdicts: Sequence[GuardVerdict],
               mode: str = "strict") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Report and per-row predictions from one Gen verdict per row.

    Args:
        rows: the evaluation rows.
        verdicts: the guard's verdict on each row's conversation, in order.
        mode: the mode whose F1 is the headline `f1` (both modes are always reported).

    Returns:
        (report, predictions): the report dict (`n`, `labels`, `predictions`, `mode`, `f1`, `metrics`,
        `parse_failures`) and one dict per row (`id`, `label`, `prediction`, `categories`, `parse_ok`, `raw`).
    """
    if len(verdicts) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(verdicts)} verdicts")
    predictions = [v.safety for v in verdicts]
    report = {"kind": "gen", **_scores(rows, predictions, mode),
              "parse_failures": sum(not v.parse_ok for v in verdicts), "latency": None}
    per_row = [{"id": r.id, "label": r.label.value, "prediction": v.safety.value if v.safety else None,
                "categories": list(v.categories), "parse_ok": v.parse_ok, "raw": v.raw}
               for r, v in zip(rows, verdicts)]
    return report, per_row


def stream_report(rows: Sequence[GuardTestRow], token_labels: Sequence[TokenLabels], mode: str = "strict",
                  rule: str = "official") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Report and per-row predictions from a Stream guard's per-token labels.

    Response rows (last message the assistant's) are debounced with `rule`; the detection index is
    `start + ` the debounced index. Latency is binned for gold-Unsafe response rows that carry a span (as
    eval_stream.py does, a Controversial pair counts as a detection under either mode); gold-Unsafe rows
    without a span are counted as `without_span`. `latency` is None when no row has a span.

    Args:
        rows: the evaluation rows.
        token_labels: one TokenLabels per row, in order.
        mode: the mode whose F1 is the headline `f1`.
        rule: debouncing rule, "official" or "paper".
    """
    if len(token_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(token_labels)} token label lists")
    predictions: list[SafetyLabel | None] = []
    per_row: list[dict[str, Any]] = []
    bins: list[str] = []
    without_span = 0
    for row, tl in zip(rows, token_labels):
        entry: dict[str, Any] = {"id": row.id, "label": row.label.value}
        if row.messages[-1]["role"] == "user":  # prompt row: the query reading at the user's <|im_end|>
            if not tl.labels:
                raise ValueError(f"{row.id}: no token labels for a prompt row")
            label = SafetyLabel(tl.labels[-1])
            entry.update(prediction=label.value, category=tl.categories[-1] if tl.categories else None)
        else:
            det = debounce(tl.labels, rule, tl.categories)
            label = det.label
            index = None if det.index is None else tl.start + det.index
            entry.update(prediction=label.value, detection_index=index, category=det.category)
            if row.label is SafetyLabel.UNSAFE:
                if row.unsafe_start_index is None or row.unsafe_end_index is None:
                    without_span += 1
                else:
                    entry["latency_bin"] = latency_bin(index, row.unsafe_start_index, row.unsafe_end_index)
                    bins.append(entry["latency_bin"])
        predictions.append(label)
        per_row.append(entry)
    latency = None
    if bins:
        summary = summarize_latency(bins)
        latency = {"rule": rule, **asdict(summary), "without_span": without_span}
    report = {"kind": "stream", "debounce": rule, **_scores(rows, predictions, mode), "latency": latency}
    return report, per_row


def evaluate_gen(guard: GenGuard, rows: Sequence[GuardTestRow], mode: str = "strict", *, batch_size: int = 32,
                 progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a Gen guard over `rows` and build its report (see `gen_report`)."""
    verdicts = guard.classify([r.messages for r in rows], batch_size=batch_size, progress=progress)
    report, per_row = gen_report(rows, verdicts, mode)
    report["guard_stats"] = guard.scorer.stats()
    return report, per_row


def evaluate_stream(labeler: TokenLabeler, rows: Sequence[GuardTestRow], mode: str = "strict",
                    rule: str = "official") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a Stream guard (any TokenLabeler) over `rows` and build its report (see `stream_report`)."""
    return stream_report(rows, labeler.token_labels([r.messages for r in rows]), mode, rule)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: counts, P/R/F1 per mode (the headline mode starred), latency bins if any."""
    labels, preds = report["labels"], report["predictions"]
    lines = [f"{report['kind']} guard: {report['n']} rows ({labels['Unsafe']} Unsafe, "
             f"{labels['Safe']} Safe); predicted "
             + ", ".join(f"{name} {count}" for name, count in preds.items())]
    if "parse_failures" in report:
        lines[0] += f"; parse failures {report['parse_failures']}"
    lines.append(f"{'mode':<8} {'precision':>9} {'recall':>7} {'F1':>7} "
                 f"{'TP':>6} {'FP':>6} {'FN':>6} {'TN':>6}")
    for mode in MODES:
        m = report["metrics"][mode]
        name = mode + (" *" if mode == report["mode"] else "")
        lines.append(f"{name:<8} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} "
                     f"{m['tp']:>6} {m['fp']:>6} {m['fn']:>6} {m['tn']:>6}")
    lines.append("(* = headline mode; strict counts Controversial as Unsafe, loose as Safe)")
    latency = report.get("latency")
    if latency:
        lines.append(f"latency ({latency['rule']} debouncing) over {latency['n']} Unsafe rows with a span: "
                     + " | ".join(f"{b} {latency['bins'][b]}" for b in LATENCY_BINS))
        lines.append(f"exact hit rate {latency['exact_hit_rate']:.4f}; first 128 tokens stop rate "
                     f"{latency['first_128_stop_rate']:.4f}; Unsafe rows without a span "
                     f"{latency['without_span']}")
    return "\n".join(lines)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through `path.partial` and a rename, so `path` is never half-written."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def run_eval(model: str, data: str, out: str, *, kind: str = "gen", mode: str = "strict",
             split: str | None = None, backend: str = "vllm", batch_size: int = 32, max_new_tokens: int = 32,
             max_model_len: int = 1024, dtype: str = "float32", predictions_out: str | None = None,
             progress: bool = True, rule: str = "official", thinking: bool = False,
             resolve: Callable[[str], str]) -> dict[str, Any]:
    """`saferl guard eval`: load and check the data, load the guard, score, write the JSON report.

    Args:
        model: guard model directory, hub id or `toyworld:<part>`.
        data: Qwen3GuardTest-layout data (see `gen.load_guardtest`) or `toyworld:stream_heldout`.
        out: where the JSON report goes.
        kind: "gen" (Qwen3Guard-Gen format) or "stream" (Qwen3Guard-Stream checkpoint, run in-process).
        mode: headline mode, "strict" or "loose" (both are reported).
        split: the split to read from a dataset directory.
        backend: "vllm" or "hf" (gen only).
        batch_size: conversations per guard call (stream: per forward).
        max_new_tokens, max_model_len: passed to the GuardScorer (gen only).
        dtype: weights dtype.
        predictions_out: optional JSONL of per-row predictions.
        progress: show a progress bar on stderr (gen only).
        rule: stream debouncing rule, "official" or "paper".
        thinking: stream: evaluate from the reasoning start (official `--thinking`), not the answer.
        resolve: turns `model` and `data` into a path or hub id (the report names them as given).

    Returns:
        The report (also written to `out`), with `model`, `data`, `split` and `seconds` added.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if rule not in DEBOUNCE_RULES:
        raise ValueError(f"rule must be one of {DEBOUNCE_RULES}, got {rule!r}")
    if kind == "stream" and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} for a Stream guard, got {dtype!r}")
    rows = load_guardtest(resolve(data), split)  # bad data fails before any weights load
    model_path = resolve(model)
    start = time.monotonic()
    if kind == "stream":
        import torch

        from saferl.guard.stream_eval import StreamLabeler

        labeler = StreamLabeler.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                batch_size=batch_size, thinking=thinking)
        report, per_row = evaluate_stream(labeler, rows, mode, rule)
    else:
        from saferl.guard.gen import GenGuard

        guard = GenGuard.from_model(model_path, backend=backend, max_new_tokens=max_new_tokens,
                                    max_model_len=max_model_len, dtype=dtype)
        report, per_row = evaluate_gen(guard, rows, mode, batch_size=batch_size, progress=progress)
    report = {"model": model, "data": str(data), "split": split, **report,
              "seconds": round(time.monotonic() - start, 3)}
    if predictions_out:
        write_atomic(predictions_out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in per_row))
    write_atomic(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
