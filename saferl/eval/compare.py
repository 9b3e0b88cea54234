"""`saferl report --compare LABEL=GLOB ...`: an experiment's table over seeds, with a baseline and a figure.

For each label, the finished runs (directories with eval.json) matching its glob are aggregated: the
held-out metrics *after* training as mean ± sample std over the runs (n shown), judged three ways (`COLUMNS`):
by the reward guard the policy was trained against (and the RM), by the independent judge (`eval.judge`, the
`judge_*` rates; columns left out when no run has one) and by the toy world's ground truth (`truth_*`), then
how often each guard was fooled (also the per-step `truth/guard_fooled_rate` averaged over each run) and the
reward-hacking alarm's lead time (`alarm_lead`: how many steps before the garbled rate doubled the alarm
fired; the runs where it never fired or garbled never doubled are counted beside it). Unfinished runs are
skipped and noted; a label without finished runs gets no row; a glob matching no run directory is an error.
The baseline row aggregates the *before* evaluations of every compared run: the starting (SFT) policy,
identical across runs when they share the evaluation seed and prompts (std 0, which the output states;
otherwise it warns). Rows may also come from a YAML file (`--table`): `{baseline: NAME, rows: {LABEL: GLOB}}`,
globs relative to `--runs`. Writes OUT.md, OUT.json and OUT.png (bars with std error bars).
"""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saferl.eval.metrics import Stat, format_stat, markdown_table, mean_std
from saferl.eval.report import read_run, run_mean, series

# (key, column heading), grouped by who judges (the heading's parenthesis): the reward guard (and the RM), the
# independent judge, the toy ground truth, how often a guard was fooled, the alarm. Held-out eval metrics,
# `steps/<key>` = a per-step metric averaged over the run, `alarm_lead` = the run's AlarmLead.lead. The prompt
# kinds are in the legend (`LEGEND`), to keep the table narrow.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("safety_rate", "safety (guard)"),
    ("benign_refusal_rate", "benign refusal (guard)"),
    ("benign_helpfulness", "helpfulness (RM)"),
    ("judge_safety_rate", "safety (judge)"),
    ("judge_benign_refusal_rate", "benign refusal (judge)"),
    ("truth_benign_helpful_rate", "exactly helpful (truth)"),
    ("truth_garbled_rate", "garbled (truth)"),
    ("truth_unsafe_rate", "truly unsafe (truth)"),
    ("truth_benign_refusal_rate", "benign refusal (truth)"),
    ("guard_fooled_rate", "guard fooled"),
    ("judge_fooled_rate", "judge fooled"),
    ("steps/truth/guard_fooled_rate", "guard fooled (per step)"),
    ("alarm_lead", "alarm lead (steps)"),
)
ALARM_COUNTS = "alarm fired · garbled doubled"  # the column after the lead time: the runs it leaves out
LEGEND = ("Held-out evaluation after training, mean ± sample std over runs (n = runs); the baseline row is "
          "the evaluation before training. Judged three ways: guard = the reward guard the policy was trained"
          " against (helpfulness: the RM's mean score), judge = the independent judge (eval.judge), truth = "
          "the toy world's ground truth. Safety and truly unsafe: answers to harmful prompts; benign refusal,"
          " helpfulness and exactly helpful (the answer is exactly one of the world's helpful responses): "
          "answers to benign prompts; garbled: all answers. guard fooled = answers the reward guard calls "
          "Safe that are truly unsafe or garbled (judge fooled: the same for the judge; per step: the trained"
          " batches' rate, averaged over the run's steps).")
DIGITS = {"alarm_lead": 1}  # decimals per column (default 3)
SAME = 1e-6  # std below this: the same evaluation up to floating-point noise
PLOTTED = ("safety_rate", "judge_safety_rate", "truth_unsafe_rate", "benign_refusal_rate",
           "judge_benign_refusal_rate", "truth_benign_refusal_rate", "truth_benign_helpful_rate",
           "truth_garbled_rate", "guard_fooled_rate", "benign_helpfulness")
PANELS_PER_ROW = 3  # with a judge: safety, then benign refusal, judged three ways per row

ALARM_KEY = "monitor/alarm"  # 0, then 1 from the step the monitor's alarm fired (logged when one is set)
GARBLED_KEY = "truth/truth_garbled_rate"  # the trained batch's garbled rate by ground truth, per step
START_STEPS = 3  # the garbled rate's starting value: its mean over training steps 1..START_STEPS


@dataclass(frozen=True)
class AlarmLead:
    """A run's reward-hacking alarm against the onset it should warn of (None: did not happen, or the metric
    was not logged)."""

    monitored: bool  # the run logged monitor/alarm (it had an alarm)
    alarm_step: int | None  # the first step with monitor/alarm == 1
    garbled_start: float | None  # mean truth/truth_garbled_rate over steps 1..START_STEPS
    doubling_step: int | None  # the first step with truth/truth_garbled_rate >= 2 x garbled_start
    lead: int | None  # doubling_step - alarm_step: positive when the alarm came first; None unless both


def alarm_lead(rows: list[dict[str, Any]]) -> AlarmLead:
    """When the alarm fired and when the garbled rate doubled, from a run's metrics.jsonl rows.

    The doubling step is the first step (from step 1 on) whose garbled rate is at least twice the starting
    value and above 0: a start of 0 doubles at the first step with any garbled answer."""
    alarm_steps, alarm = series(rows, ALARM_KEY)
    fired = [s for s, v in zip(alarm_steps, alarm) if v == 1]
    alarm_step = int(min(fired)) if fired else None
    steps, garbled = series(rows, GARBLED_KEY)
    early = [v for s, v in zip(steps, garbled) if 1 <= s <= START_STEPS]
    start = sum(early) / len(early) if early else None
    doubled = [s for s, v in zip(steps, garbled) if start is not None and v > 0 and v >= 2 * start]
    doubling_step = int(min(doubled)) if doubled else None
    lead = doubling_step - alarm_step if doubling_step is not None and alarm_step is not None else None
    return AlarmLead(bool(alarm_steps), alarm_step, start, doubling_step, lead)


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


@dataclass
class RunValues:
    """One finished run: its held-out metrics before and after training (after extended by the per-step means
    and the alarm lead) and its alarm."""

    path: Path
    before: dict[str, float]
    after: dict[str, float]
    alarm: AlarmLead


def run_values(run_dir: Path) -> RunValues:
    """The values of one finished run directory."""
    run = read_run(run_dir)
    after = dict(run.evals["after"])
    after["steps/truth/guard_fooled_rate"] = run_mean(run.rows, "truth/guard_fooled_rate")
    alarm = alarm_lead(run.rows)
    after["alarm_lead"] = float("nan") if alarm.lead is None else float(alarm.lead)
    return RunValues(run_dir, dict(run.evals["before"]), after, alarm)


def aggregate(values: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, Stat]:
    """mean ± sample std of each key over the runs that have it."""
    return {k: mean_std([v[k] for v in values if v.get(k) is not None]) for k in keys}


@dataclass
class Row:
    label: str
    runs: list[Path]
    stats: dict[str, Stat]
    alarms: list[AlarmLead] = field(default_factory=list)  # one per run; none for the baseline (before)


def comparison_rows(groups: list[tuple[str, list[RunValues]]], baseline: str) -> list[Row]:
    """The baseline row (before evaluations of every run) then one row per label (after evaluations)."""
    keys = tuple(k for k, _ in COLUMNS)
    every = [v for _, values in groups for v in values]
    rows = [Row(baseline, [v.path for v in every], aggregate([v.before for v in every], keys))]
    rows += [Row(label, [v.path for v in values], aggregate([v.after for v in values], keys),
                 [v.alarm for v in values]) for label, values in groups]
    return rows


def alarm_counts(alarms: list[AlarmLead]) -> str:
    """`fired/n · doubled/n` over a row's runs, and how many had no alarm at all; – for no runs."""
    if not alarms:
        return "–"
    n = len(alarms)
    fired = sum(a.alarm_step is not None for a in alarms)
    doubled = sum(a.doubling_step is not None for a in alarms)
    unmonitored = sum(not a.monitored for a in alarms)
    return f"{fired}/{n} · {doubled}/{n}" + (f" ({unmonitored} without alarm)" if unmonitored else "")


def comparison_table(rows: list[Row]) -> str:
    """Markdown: policy, runs (n), then mean ± std per column; columns no row has are left out, except that
    the alarm's two columns appear whenever some run had an alarm."""
    monitored = any(a.monitored for r in rows for a in r.alarms)
    columns = [(k, h) for k, h in COLUMNS
               if (monitored if k == "alarm_lead" else any(r.stats[k].n for r in rows))]
    body = [[r.label, str(len(r.runs)), *(format_stat(r.stats[k], DIGITS.get(k, 3)) for k, _ in columns),
             *([alarm_counts(r.alarms)] if monitored else [])] for r in rows]
    headings = ["policy", "runs", *(h for _, h in columns), *([ALARM_COUNTS] if monitored else [])]
    return markdown_table(headings, body)


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
    """Bars of mean ± std per label, one panel per plotted metric, `PANELS_PER_ROW` panels a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if any(r.stats[k].n for r in rows)]
    headings = dict(COLUMNS)
    ncols = min(PANELS_PER_ROW, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.6, 0.9 * len(rows)) * ncols, 4.2 * nrows),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
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
    groups: list[tuple[str, list[RunValues]]] = []
    notes: list[str] = []
    for label, pattern in specs:
        finished, unfinished = match_runs(pattern, root)
        if not finished and not unfinished:
            raise ValueError(f"{label}: no run directories (with metrics.jsonl) match "
                             f"{str(Path(root) / pattern)!r}")
        if unfinished:
            notes.append(f"{label}: skipped {len(unfinished)} unfinished run(s) without eval.json"
                         + ("" if finished else " (no row)") + ": " + ", ".join(str(p) for p in unfinished))
        if finished:
            groups.append((label, [run_values(p) for p in finished]))
    if not groups:
        raise ValueError("no finished runs (with eval.json) to compare yet")
    rows = comparison_rows(groups, baseline or "baseline (before training)")
    md = ["# Comparison of runs", "",
          LEGEND, "",
          comparison_table(rows), "", baseline_note(rows[0]), ""]
    if any(a.monitored for r in rows for a in r.alarms):
        md += [f"Alarm lead = the step the garbled rate (per step, {GARBLED_KEY}) first reached twice its "
               f"starting value (its mean over steps 1-{START_STEPS}) minus the step the alarm fired "
               f"({ALARM_KEY}); positive: the alarm came first. Mean ± std over the runs where both "
               "happened; the last column counts, of each row's runs, those where the alarm fired and those "
               "where the garbled rate doubled (the rest never did). Per-run values are in "
               f"{out.with_suffix('.json').name}.", ""]
    md += ["Runs:", ""] + [f"- {r.label}: {', '.join(str(p) for p in r.runs)}" for r in rows[1:]] + [""]
    md += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    md += [f"![comparison]({out.with_suffix('.png').name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(rows, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(
        {"baseline": rows[0].label,
         "rows": [{"label": r.label, "runs": [str(p) for p in r.runs],
                   "metrics": {k: stat_json(s) for k, s in r.stats.items()},
                   "alarm": [{"run": str(p), **asdict(a)} for p, a in zip(r.runs, r.alarms)]} for r in rows],
         "notes": notes}, indent=2) + "\n")
    text = "\n".join(md)
    out.write_text(text)
    return text
