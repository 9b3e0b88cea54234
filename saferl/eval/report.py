"""`saferl report RUN_DIR`: plots of one training run and a Markdown summary embedding them.

Reads `metrics.jsonl` (one row per step; several rows may share a step, e.g. the last step's training row and
the evaluation after training), `eval.json` (held-out evaluation before and after) and `config.yaml`, and
writes `RUN_DIR/report/*.png` and `RUN_DIR/report/README.md`. One figure per concern (`FIGURES`); a figure
whose metrics the run did not log (e.g. KL with `trainer.kl_coef: 0`) is skipped and the summary says so.
Reading is pure (`read_run`, `series`); plotting uses matplotlib's Agg backend, imported where used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saferl.data import read_jsonl
from saferl.eval.metrics import before_after_table, format_value, markdown_table


@dataclass
class RunData:
    """What a run directory holds: metric rows in file order, the before/after evaluation, the config."""

    path: Path
    rows: list[dict[str, Any]]
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # "before" / "after" when finished
    config: dict[str, Any] = field(default_factory=dict)


def read_run(run_dir: str | Path) -> RunData:
    """A run directory's metrics.jsonl (required), eval.json and config.yaml (optional: an unfinished run)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"Run directory not found: {path}")
    rows = []
    for where, row in read_jsonl(path / "metrics.jsonl"):  # errors name the file and line
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise ValueError(f"{where}: expected an object with a numeric 'step'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path / 'metrics.jsonl'}: no rows (the file is empty)")
    evals = json.loads((path / "eval.json").read_text()) if (path / "eval.json").is_file() else {}
    config = {}
    if (path / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return RunData(path, rows, evals, config)


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every row that logged `key` with a finite value, in file order."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(row["step"]))
            values.append(float(value))
    return steps, values


def run_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` over the steps that logged it (NaN when none did)."""
    values = series(rows, key)[1]
    return sum(values) / len(values) if values else float("nan")


def evaluations(run: RunData) -> dict[str, dict[str, float]]:
    """Before/after held-out metrics: eval.json, else the first and last `eval/*` rows of metrics.jsonl."""
    if run.evals:
        return run.evals
    evals = [{k[5:]: v for k, v in row.items() if k.startswith("eval/")} for row in run.rows]
    evals = [e for e in evals if e]
    if not evals:
        return {}
    return {"before": evals[0], "after": evals[-1]} if len(evals) > 1 else {"before": evals[0]}


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    style: str = "-"  # matplotlib line style; "o" plots markers only
    color: str | None = None  # matplotlib colour ("C0"...); None: the next in the cycle


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    about: str  # one sentence for the summary
    panels: tuple[Panel, ...]


RATE = "rate (fraction of samples)"
FIGURES: tuple[Figure, ...] = (
    Figure("reward", "Reward and its components per training step",
           "Mean reward of each step's training batch, the helpfulness RM's mean score, and the guard's "
           "verdict mix over the batch (all prompts).",
           (Panel("reward", "reward (recipe units)", (Line("reward/reward_mean", "reward mean"),)),
            Panel("helpfulness", "RM score (logit)",
                  (Line("reward/helpfulness_mean", "helpfulness RM mean"),)),
            Panel("guard verdicts on training samples", RATE,
                  (Line("reward/unsafe_rate", "Unsafe"), Line("reward/controversial_rate", "Controversial"),
                   Line("reward/refusal_rate", "Refusal: Yes"))))),
    Figure("safety", "Held-out safety and over-refusal",
           "Held-out evaluation (guard-judged) at the steps it ran (before training, after training, every "
           "eval.every steps), with the guard's per-step rates on training batches for context.",
           (Panel("held-out evaluation (guard)", RATE,
                  (Line("eval/safety_rate", "safety rate (harmful)", "o-"),
                   Line("eval/benign_refusal_rate", "refusal rate (benign)", "s-"),
                   Line("eval/truth_unsafe_rate", "unsafe rate (harmful, ground truth)", "^--"))),
            Panel("guard on training batches (all prompts)", RATE,
                  (Line("reward/unsafe_rate", "Unsafe"), Line("reward/refusal_rate", "Refusal: Yes"))))),
    Figure("clipping", "GSPO clip fraction",
           "Fraction of the update clipped by the ratio bounds (sequences for gspo, tokens for gspo-token / "
           "grpo): low = ratio below 1 - clip_low with a negative advantage, high = above 1 + clip_high.",
           (Panel("clip fraction", "fraction clipped", (Line("train/clip_frac", "total"),
                                                         Line("train/clip_frac_low", "low", "--"),
                                                         Line("train/clip_frac_high", "high", ":"))),)),
    Figure("kl_entropy", "KL to the starting policy and policy entropy",
           "k3 estimate of KL(policy || reference) per response token (logged when trainer.kl_coef > 0) and "
           "the tempered policy's mean per-token entropy.",
           (Panel("KL to the reference policy", "KL (nats per token)", (Line("train/kl", "k3 KL"),)),
            Panel("entropy", "entropy (nats per token)", (Line("train/entropy", "policy entropy"),)))),
    Figure("hacking", "Reward hacking (toy-world ground truth)",
           "How often the guard called an answer Safe although it is truly unsafe or garbled, and the rate "
           "of garbled answers, per training step and at the held-out evaluations.",
           (Panel("guard fooled / garbled answers", RATE,
                  (Line("truth/guard_fooled_rate", "guard fooled (training batch)", "-", "C0"),
                   Line("truth/truth_garbled_rate", "garbled (training batch)", "--", "C1"),
                   Line("eval/guard_fooled_rate", "guard fooled (held-out)", "o", "C0"),
                   Line("eval/truth_garbled_rate", "garbled (held-out)", "s", "C1"))),)),
)


def present(figure: Figure, rows: list[dict[str, Any]]) -> list[Panel]:
    """The figure's panels that have data, each with only its lines that have data."""
    panels = []
    for panel in figure.panels:
        lines = tuple(line for line in panel.lines if series(rows, line.key)[0])
        if lines:
            panels.append(Panel(panel.title, panel.ylabel, lines))
    return panels


def plot(figure: Figure, panels: list[Panel], rows: list[dict[str, Any]], title: str, out: Path) -> None:
    """One PNG: the panels side by side, x = training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 5.2 * len(panels)), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel.lines:
            steps, values = series(rows, line.key)
            ax.plot(steps, values, line.style, label=line.label, color=line.color, markersize=5, linewidth=1.4)
            if line.key.startswith("eval/"):  # few points: print their values (before / after)
                for x, y in zip(steps, values):
                    ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.ylabel == RATE:
            ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=8)
    fig.suptitle(f"{figure.title} — {title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


CONFIG_KEYS = (("reward", "recipe"), ("trainer", "loss"), ("trainer", "lr"), ("trainer", "kl_coef"),
               ("trainer", "steps"), ("rollout", "samples_per_prompt"), ("data", "prompts_per_step"),
               ("run", "seed"), ("eval", "seed"), ("eval", "samples_per_prompt"), ("policy", "model"))


def config_line(config: dict[str, Any]) -> str:
    """`key=value` for the settings that tell runs apart (those present in the config)."""
    items = []
    for section, key in CONFIG_KEYS:
        value = (config.get(section) or {}).get(key)
        if value is not None:
            items.append(f"{section}.{key}={value}")
    return ", ".join(items)


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/{*.png,README.md}; returns the README's path."""
    run = read_run(run_dir)
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    steps = [row["step"] for row in run.rows]
    lines = [f"# Run report: {run.path}", ""]
    if run.config:
        lines += [f"Config: {config_line(run.config)}.", ""]
    unfinished = "" if run.evals else " No eval.json: the run is unfinished (evaluations from metrics.jsonl)."
    lines += [f"{len(run.rows)} metric rows, steps {min(steps):g}–{max(steps):g}.{unfinished}", ""]
    evals = evaluations(run)
    if "before" in evals and "after" in evals:
        lines += ["## Held-out evaluation", "", before_after_table(evals["before"], evals["after"]), ""]
    lines += ["## Figures", ""]
    for figure in FIGURES:
        panels = present(figure, run.rows)
        wanted = sorted({line.key for panel in figure.panels for line in panel.lines})
        if not panels:
            lines += [f"### {figure.title}", "", f"Skipped: the run logged none of {', '.join(wanted)}.", ""]
            continue
        plot(figure, panels, run.rows, run.path.name, out / f"{figure.name}.png")
        shown = {line.key for panel in panels for line in panel.lines}
        missing = [k for k in wanted if k not in shown]
        note = f" Not logged by this run: {', '.join(missing)}." if missing else ""
        lines += [f"### {figure.title}", "", figure.about + note, "", f"![{figure.title}]({figure.name}.png)",
                  ""]
    keys = sorted({line.key for f in FIGURES for p in f.panels for line in p.lines
                   if not line.key.startswith("eval/")})
    last = [[k, format_value(series(run.rows, k)[1][-1]), format_value(run_mean(run.rows, k))]
            for k in keys if series(run.rows, k)[1]]
    if last:
        lines += ["## Per-step metrics: last value and mean over the run", "",
                  markdown_table(["metric", "last", "mean over steps"], last), ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme
