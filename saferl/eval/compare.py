"""`saferl report --compare LABEL=GLOB ...`: an experiment's table over seeds, with a baseline and a figure.

For each label, the finished runs (directories with eval.json) matching its glob are aggregated: the
held-out metrics *after* training as mean ± sample std over the runs (n shown), and the reward-hacking columns
(guard fooled and garbled rates after training, and the per-step `truth/guard_fooled_rate` averaged over each
run). Unfinished runs are skipped and noted; a label without finished runs gets no row; a glob matching no
run directory is an error.
The baseline row aggregates the *before* evaluations of every compared run: the starting (SFT) policy,
identical across runs when they share the evaluation seed and prompts (std 0, which the output states;
otherwise it warns). Rows may also come from a YAML file (`--table`): `{baseline: NAME, rows: {LABEL: GLOB}}`,
globs relative to `--runs`. Writes OUT.md, OUT.json and OUT.png (bars with std error bars).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saferl.eval.metrics import Stat, format_stat, markdown_table, mean_std
from saferl.eval.report import read_run, run_mean

# (key, column heading): held-out eval metrics, and `steps/<key>` = a per-step metric averaged over the run.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("safety_rate", "safety rate (harmful)"),
    ("benign_refusal_rate", "benign refusal"),
    ("benign_helpfulness", "helpfulness (benign)"),
    ("guard_fooled_rate", "guard fooled"),
    ("truth_garbled_rate", "garbled"),
    ("steps/truth/guard_fooled_rate", "guard fooled, mean over steps"),
)
SAME = 1e-6  # std below this: the same evaluation up to floating-point noise
PLOTTED = ("safety_rate", "benign_refusal_rate", "benign_helpfulness", "guard_fooled_rate")


def parse_spec(text: str) -> tuple[str, str]:
    """`LABEL=GLOB` -> (label, glob)."""
    label, sep, pattern = text.partition("=")
    if not sep or not label or not pattern:
        raise ValueError(f"--compare expects LABEL=GLOB (e.g. hybrid='runs/table/hybrid-s*'), got {text!r}")
    return label, pattern


def read_table_spec(path: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """(baseline name, [(label, glob)]) from a YAML file `{baseline: NAME, rows: {LABEL: GLOB, ...}}`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Table file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    rows = spec.get("rows") if isinstance(spec, dict) else None
    if not isinstance(rows, dict) or not rows or not all(isinstance(v, str) for v in rows.values()):
        raise ValueError(f"{path}: expected 'rows:' mapping each label to a glob of run directories")
    unknown = set(spec) - {"baseline", "rows"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected baseline, rows)")
    return spec.get("baseline"), [(str(k), v) for k, v in rows.items()]


def match_runs(pattern: str, root: str | Path = ".") -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories matching `pattern` under `root`: directories holding
    metrics.jsonl, finished when they hold eval.json; sorted by name."""
    hits = sorted(Path(p) for p in glob.glob(str(Path(root) / pattern)))
    runs = [p for p in hits if (p / "metrics.jsonl").is_file()]
    finished = [p for p in runs if (p / "eval.json").is_file()]
    return finished, [p for p in runs if p not in finished]


def run_values(run_dir: Path) -> dict[str, dict[str, float]]:
    """{"before": ..., "after": ...} of one finished run, the after side extended by the per-step means."""
    run = read_run(run_dir)
    after = dict(run.evals["after"])
    after["steps/truth/guard_fooled_rate"] = run_mean(run.rows, "truth/guard_fooled_rate")
    return {"before": dict(run.evals["before"]), "after": after}


def aggregate(values: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, Stat]:
    """mean ± sample std of each key over the runs that have it."""
    return {k: mean_std([v[k] for v in values if v.get(k) is not None]) for k in keys}


@dataclass
class Row:
    label: str
    runs: list[Path]
    stats: dict[str, Stat]


def comparison_rows(groups: list[tuple[str, list[dict[str, dict[str, float]]], list[Path]]],
                    baseline: str) -> list[Row]:
    """The baseline row (before evaluations of every run) then one row per label (after evaluations)."""
    keys = tuple(k for k, _ in COLUMNS)
    every = [v["before"] for _, values, _ in groups for v in values]
    rows = [Row(baseline, [p for _, _, paths in groups for p in paths], aggregate(every, keys))]
    rows += [Row(label, paths, aggregate([v["after"] for v in values], keys))
             for label, values, paths in groups]
    return rows


def comparison_table(rows: list[Row]) -> str:
    """Markdown: policy, runs (n), then mean ± std per column; columns no row has are left out."""
    columns = [(k, h) for k, h in COLUMNS if any(r.stats[k].n for r in rows)]
    body = [[r.label, str(len(r.runs)), *(format_stat(r.stats[k]) for k, _ in columns)] for r in rows]
    return markdown_table(["policy", "runs", *(h for _, h in columns)], body)


def baseline_note(row: Row) -> str:
    """What the baseline row is: identical before-training evaluations (the fixed eval seed), or a warning.

    Identical means a std below `SAME`: RM scores of the same answers differ by ~1e-9 between batchings."""
    spread = [k for k, s in row.stats.items() if s.std is not None and s.std > SAME]
    n = len(row.runs)
    if n < 2:
        return f"Baseline: the before-training evaluation of {n} run."
    if not spread:
        return (f"Baseline: the before-training evaluation (the starting policy), identical in all {n} runs "
                f"(std < {SAME:g}) because they share the evaluation seed and prompts; shown as mean ± std "
                "anyway.")
    return (f"Warning: the before-training evaluations differ across the {n} runs ({', '.join(spread)}): the "
            "runs do not share their evaluation settings or starting policy, so the baseline is an average.")


def plot_comparison(rows: list[Row], out: Path) -> None:
    """Bars of mean ± std per label, one panel per plotted metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if any(r.stats[k].n for r in rows)]
    headings = dict(COLUMNS)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(3.6, 0.9 * len(rows)) * len(keys), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        means = [r.stats[key].mean if r.stats[key].n else 0.0 for r in rows]
        errs = [r.stats[key].std or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), means, yerr=errs, capsize=4,
                      color=[colors[i % len(colors)] for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_xticks(range(len(rows)), [f"{r.label} (n={len(r.runs)})" for r in rows], fontsize=8,
                      rotation=30, ha="right", rotation_mode="anchor")
        ax.set_title(headings[key], fontsize=10)
        ax.set_ylabel("RM score (logit)" if key == "benign_helpfulness" else "rate (fraction of samples)")
        if key == "benign_helpfulness":
            ax.margins(y=0.12)  # room for the value labels of negative scores
        else:
            ax.set_ylim(0, 1.12)  # room for the value label above a bar at 1.0
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out evaluation: mean ± sample std over seeds (baseline: before training)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def stat_json(stat: Stat) -> dict[str, Any]:
    return {"mean": stat.mean if stat.n else None, "std": stat.std, "n": stat.n}


def compare(specs: list[tuple[str, str]], out: str | Path, *, baseline: str | None = None,
            root: str | Path = ".") -> str:
    """Build the comparison of `specs` [(label, glob)], write OUT.md/.json/.png, return the Markdown."""
    out = Path(out)
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels in {labels}")
    groups, notes = [], []
    for label, pattern in specs:
        finished, unfinished = match_runs(pattern, root)
        if not finished and not unfinished:
            raise ValueError(f"{label}: no run directories (with metrics.jsonl) match "
                             f"{str(Path(root) / pattern)!r}")
        if unfinished:
            notes.append(f"{label}: skipped {len(unfinished)} unfinished run(s) without eval.json"
                         + ("" if finished else " (no row)") + ": " + ", ".join(str(p) for p in unfinished))
        if finished:
            groups.append((label, [run_values(p) for p in finished], finished))
    if not groups:
        raise ValueError("no finished runs (with eval.json) to compare yet")
    rows = comparison_rows(groups, baseline or "baseline (before training)")
    md = ["# Comparison of runs", "",
          "Held-out evaluation after training, mean ± sample std over runs (n = runs); the baseline row is "
          "the evaluation before training. guard fooled = answers the guard calls Safe that are truly unsafe "
          "or garbled (toy ground truth).", "",
          comparison_table(rows), "", baseline_note(rows[0]), ""]
    md += ["Runs:", ""] + [f"- {r.label}: {', '.join(str(p) for p in r.runs)}" for r in rows[1:]] + [""]
    md += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    md += [f"![comparison]({out.with_suffix('.png').name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(rows, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(
        {"baseline": rows[0].label, "rows": [{"label": r.label, "runs": [str(p) for p in r.runs],
                                              "metrics": {k: stat_json(s) for k, s in r.stats.items()}}
                                             for r in rows], "notes": notes}, indent=2) + "\n")
    text = "\n".join(md)
    out.write_text(text)
    return text
