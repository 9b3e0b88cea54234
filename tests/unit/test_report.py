"""`saferl report` on synthetic run directories: one run's figures and summary (figures without data skipped and
noted), bad metrics files naming the line, and the multi-run comparison (mean ± std, baseline, files)."""

import json

import pytest

from saferl.cli import main
from saferl.eval.report import FIGURES, read_run, series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BEFORE = {"safety_rate": 0.4, "benign_refusal_rate": 0.25, "benign_helpfulness": 0.4, "samples": 16.0,
          "truth_unsafe_rate": 0.5, "truth_benign_refusal_rate": 0.2, "truth_garbled_rate": 0.1,
          "guard_fooled_rate": 0.05}


def make_run(path, *, steps=6, train=True, truth=True, after=None, finished=True, kl=True):
    """A run directory as `saferl train` writes it, with smooth made-up metrics."""
    path.mkdir(parents=True)
    after = after or {**BEFORE, "safety_rate": 0.9, "benign_refusal_rate": 0.05, "guard_fooled_rate": 0.3}
    rows = [{"step": 0, "time": 0.0, **{f"eval/{k}": v for k, v in BEFORE.items()}}]
    for s in range(1, steps + 1):
        row = {"step": s, "time": float(s), "reward/reward_mean": -4.0 + s * 0.6, "reward/helpfulness_mean": 0.4,
               "reward/unsafe_rate": 0.3 / s, "reward/refusal_rate": 0.2 / s, "reward/controversial_rate": 0.01}
        if train:
            row.update({"train/clip_frac": 0.3, "train/clip_frac_low": 0.1, "train/clip_frac_high": 0.2,
                        "train/entropy": 0.1 + 0.01 * s})
            if kl:
                row["train/kl"] = 0.001 * s
        if truth:
            row.update({"truth/guard_fooled_rate": 0.05 * s, "truth/truth_garbled_rate": 0.06 * s})
        rows.append(row)
    rows.append({"step": steps, "time": 99.0, **{f"eval/{k}": v for k, v in after.items()}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text("reward:\n  recipe: hybrid\ntrainer:\n  lr: 0.0001\n  kl_coef: 0.1\n")
    if finished:
        (path / "eval.json").write_text(json.dumps({"before": BEFORE, "after": after}))
    return path


def test_run_report_writes_every_figure(tmp_path):
    run = make_run(tmp_path / "run")
    readme = write_report(run)
    text = readme.read_text()
    for figure in FIGURES:
        png = run / "report" / f"{figure.name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 15_000, figure.name  # a drawn figure, not a blank
        assert f"![{figure.title}]({figure.name}.png)" in text
    assert "reward.recipe=hybrid" in text and "trainer.kl_coef=0.1" in text
    assert "| safety rate (harmful, reward guard)" in text and "+0.500" in text
    assert "Skipped" not in text


def test_missing_metrics_skip_figures_with_a_note(tmp_path):
    run = make_run(tmp_path / "run", train=False, truth=False, finished=False)
    text = write_report(run).read_text()
    names = {p.stem for p in (run / "report").glob("*.png")}
    assert names == {"reward", "safety", "hacking"}  # hacking: the held-out guard_fooled points still exist
    assert "Skipped: the run logged none of train/clip_frac, train/clip_frac_high, train/clip_frac_low." in text
    assert "Skipped: the run logged none of train/entropy, train/kl." in text
    assert "No eval.json" in text and "| safety rate (harmful, reward guard)" in text  # before/after from metrics rows
    assert "Not logged by this run: truth/guard_fooled_rate, truth/truth_garbled_rate." in text


def test_kl_absent_keeps_entropy(tmp_path):
    run = make_run(tmp_path / "run", kl=False)
    text = write_report(run).read_text()
    assert "(kl_entropy.png)" in text and "Not logged by this run: train/kl." in text


def test_series_and_bad_metrics_file(tmp_path):
    rows = [{"step": 1, "a": 1.0}, {"step": 2, "a": None}, {"step": 3}, {"step": 3, "a": 2.5}]
    assert series(rows, "a") == ([1.0, 3.0], [1.0, 2.5])
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "a": \n')
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:2: not valid JSON"):
        read_run(run)
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"no_step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected an object with a numeric 'step'"):
        read_run(run)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        read_run(run)
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_compare_over_seeds(tmp_path, capsys):
    root = tmp_path / "table"
    for seed, safety in ((1, 0.8), (2, 0.9)):
        make_run(root / f"hybrid-s{seed}", after={**BEFORE, "safety_rate": safety, "guard_fooled_rate": 0.2})
    make_run(root / "guard_only-s1", after={**BEFORE, "safety_rate": 1.0, "guard_fooled_rate": 0.6})
    make_run(root / "guard_only-s2", finished=False)  # still running: skipped, and said so
    (root / "hybrid-s1.log").write_text("not a run")
    out = tmp_path / "out" / "results.md"
    code = main(["report", "--compare", "hybrid=hybrid-s*", "guard_only=guard_only-s*", "--runs", str(root),
                 "--baseline", "SFT", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    text = out.read_text()
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and "policy" not in line}
    assert lines["SFT"][:2] == ["3", "0.400 ± 0.000"]
    assert lines["hybrid"][:2] == ["2", "0.850 ± 0.071"]
    assert lines["guard_only"][:2] == ["1", "1.000"]
    # guard fooled, mean over steps: steps 1..6 of 0.05*s -> 0.175
    assert lines["hybrid"][-1] == "0.175 ± 0.000"
    assert "identical in all 3 runs" in text and "guard_only: skipped 1 unfinished run" in text
    data = json.loads(out.with_suffix(".json").read_text())
    hybrid = data["rows"][1]
    assert hybrid["label"] == "hybrid" and hybrid["metrics"]["safety_rate"]["n"] == 2
    assert hybrid["metrics"]["safety_rate"]["std"] == pytest.approx(0.0707107, abs=1e-7)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 15_000
    assert "![comparison](results.png)" in text

    spec = tmp_path / "table.yaml"
    spec.write_text("baseline: SFT (before RL)\nrows:\n  hybrid: hybrid-s*\n")
    assert main(["report", "--table", str(spec), "--runs", str(root), "-o", str(tmp_path / "t.md")]) == 0
    assert "| SFT (before RL) |" in (tmp_path / "t.md").read_text()
    capsys.readouterr()
    assert main(["report", "--compare", "x=nothing-*", "--runs", str(root), "-o", str(tmp_path / "x.md")]) == 2
    assert "x: no run directories (with metrics.jsonl) match" in capsys.readouterr().err
    make_run(root / "no_kl-s1", finished=False)
    assert main(["report", "--compare", "h=hybrid-s*", "n=no_kl-s*", "--runs", str(root), "-o",
                 str(tmp_path / "z.md")]) == 0
    assert "n: skipped 1 unfinished run(s) without eval.json (no row)" in (tmp_path / "z.md").read_text()
    assert main(["report", "--compare", "n=no_kl-s*", "--runs", str(root), "-o", str(tmp_path / "z.md")]) == 2
    assert main(["report", str(root / "hybrid-s1"), "--compare", "a=b", "-o", str(tmp_path / "y.md")]) == 2
