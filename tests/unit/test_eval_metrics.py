"""Evaluation arithmetic against hand-computed values: rates per kind and category, mean ± sample std over runs,
and the Markdown tables of `saferl eval` and `saferl report --compare`."""

import math
from pathlib import Path

import pytest

from saferl.eval.compare import (
    AlarmLead,
    Row,
    RunValues,
    baseline_note,
    comparison_rows,
    comparison_table,
    parse_spec,
)
from saferl.eval.metrics import (
    Judged,
    Stat,
    before_after_table,
    format_stat,
    judge,
    markdown_table,
    mean_std,
    models_table,
    policy_metrics,
)
from saferl.data import subsample
from saferl.eval.run import PolicyRef, check_labels, describe, parse_policy
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel, SafetyPolicy, ScoredRollout

SAFE, UNSAFE, CONTRO = SafetyLabel.SAFE, SafetyLabel.UNSAFE, SafetyLabel.CONTROVERSIAL


def test_policy_metrics_by_kind_and_category():
    samples = [Judged("harmful", "Violent", True, False, 0.0), Judged("harmful", "Violent", False, False, 0.0),
               Judged("harmful", "PII", True, True, 0.0), Judged("benign", None, True, True, 0.5),
               Judged("benign", None, True, False, 1.5), Judged("controversial", "Unethical Acts", False, False, 9.0)]
    m = policy_metrics(samples)
    assert m["safety_rate"] == pytest.approx(2 / 3)
    assert m["safety_rate/Violent"] == 0.5 and m["safety_rate/PII"] == 1.0
    assert "safety_rate/Unethical Acts" not in m  # controversial prompts are not harmful ones
    assert m["benign_refusal_rate"] == 0.5
    assert m["benign_helpfulness"] == 1.0  # (0.5 + 1.5) / 2: benign prompts only
    assert (m["samples"], m["harmful_samples"], m["benign_samples"]) == (6.0, 3.0, 2.0)


def test_policy_metrics_without_rm_or_kinds():
    m = policy_metrics([Judged("benign", None, True, False, None)])
    assert "benign_helpfulness" not in m and math.isnan(m["safety_rate"]) and m["benign_refusal_rate"] == 0.0


def _rollout(kind, category=None):
    prompt = Prompt(id="p", messages=[{"role": "user", "content": "q"}], kind=kind, category=category)
    return Rollout(prompt, [], [], [], "a", "", "a", "stop")


def test_judge_counts_thinking_and_controversial_as_unsafe():
    answers = [GuardVerdict(SAFE, refusal=True), GuardVerdict(SAFE, refusal=False),
               GuardVerdict(CONTRO, refusal=None), GuardVerdict(None, parse_ok=False)]
    thinking = [None, GuardVerdict(UNSAFE), None, None]
    scored = [ScoredRollout(_rollout("harmful", "PII"), a, t, h)
              for a, t, h in zip(answers, thinking, [1.0, 2.0, 3.0, 4.0], strict=True)]
    judged = judge(scored, SafetyPolicy())  # strict, unparsable unsafe: the schema defaults
    assert [j.safe for j in judged] == [True, False, False, False]  # unparsable counts as not Safe
    assert [j.refusal for j in judged] == [True, False, False, False]
    assert [j.helpfulness for j in judged] == [1.0, 2.0, 3.0, 4.0] and judged[0].category == "PII"


def test_mean_std_is_the_sample_std():
    s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # squared deviations 2.25+0.25+0.25+2.25 over n-1 = 3
    assert mean_std([0.8, 0.9]).std == pytest.approx(0.0707107, abs=1e-7)
    assert mean_std([0.7]) == Stat(0.7, None, 1)
    assert mean_std([0.5, float("nan"), None]) == Stat(0.5, None, 1)
    empty = mean_std([])
    assert empty.n == 0 and empty.std is None and math.isnan(empty.mean)


def test_format_stat():
    assert format_stat(Stat(0.9, 0.01234, 3)) == "0.900 ± 0.012"
    assert format_stat(Stat(0.9, None, 1)) == "0.900"
    assert format_stat(Stat(float("nan"), None, 0)) == "–"
    assert format_stat(Stat(0.25, 0.0, 2), digits=2) == "0.25 ± 0.00"


def test_markdown_table_pads_and_aligns():
    assert markdown_table(["name", "x"], [["a", "1.0"], ["long name", "22.50"]]) == (
        "| name      |     x |\n"
        "|-----------|------:|\n"
        "| a         |   1.0 |\n"
        "| long name | 22.50 |")
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(["a", "b", "c"], [["1", "2"]])


def test_models_table_rows_and_columns():
    a = {"safety_rate": 0.5, "benign_refusal_rate": 0.25, "safety_rate/PII": 1.0, "samples": 8.0}
    b = {"safety_rate": 0.75, "benign_refusal_rate": float("nan"), "safety_rate/Violent": 0.0, "samples": 8.0}
    lines = models_table({"sft": a, "rl": b}).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["held-out metric", "sft", "rl"]
    body = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in lines[2:]}
    assert body == {"safety rate (harmful, guard)": ["0.500", "0.750"],
                    "benign refusal rate (guard)": ["0.250", "–"],
                    "safety rate: PII": ["1.000", "–"], "safety rate: Violent": ["–", "0.000"],
                    "samples: all": ["8", "8"]}
    assert list(body)[2:4] == ["safety rate: PII", "safety rate: Violent"]  # categories after the headline


def test_before_after_table_change():
    table = before_after_table({"safety_rate": 0.375, "samples": 4.0}, {"safety_rate": 0.875, "samples": 4.0})
    assert table.splitlines()[2] == "| safety rate (harmful, reward guard) |  0.375 | 0.875 | +0.500 |"
    assert "samples" not in table


def test_before_after_table_ground_truth_rows():
    truth = {"truth_unsafe_rate": 0.5, "truth_benign_refusal_rate": 0.2, "truth_benign_helpful_rate": 0.66,
             "truth_garbled_rate": 0.13, "guard_fooled_rate": 0.1}
    after = {**truth, "truth_benign_helpful_rate": 0.41}
    lines = before_after_table(truth, after).splitlines()[2:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert [r[0] for r in rows] == [
        "unsafe rate (harmful, ground truth)", "benign refusal rate (ground truth)",
        "exactly helpful (benign, ground truth)", "garbled answers (ground truth)",
        "reward guard fooled (Safe but truly unsafe/garbled)"]
    assert rows[2] == ["exactly helpful (benign, ground truth)", "0.660", "0.410", "-0.250"]


NO_ALARM = AlarmLead(False, None, None, None, None)


def _values(before, after, fooled_steps, path="run"):
    return RunValues(Path(path), before, {**after, "steps/truth/guard_fooled_rate": fooled_steps}, NO_ALARM)


def test_comparison_rows_mean_std_over_seeds():
    base = {"safety_rate": 0.4, "benign_refusal_rate": 0.2}
    hybrid = [
        _values(base, {"safety_rate": 0.8, "benign_refusal_rate": 0.1, "guard_fooled_rate": 0.2}, 0.1, "h1"),
        _values(base, {"safety_rate": 0.9, "benign_refusal_rate": 0.3, "guard_fooled_rate": 0.4}, 0.3, "h2")]
    guard_only = [
        _values(base, {"safety_rate": 1.0, "benign_refusal_rate": 0.6, "guard_fooled_rate": 0.1}, 0.2, "g1")]
    rows = comparison_rows([("hybrid", hybrid), ("guard_only", guard_only)], "SFT")
    assert [r.label for r in rows] == ["SFT", "hybrid", "guard_only"]
    assert rows[0].runs == [Path("h1"), Path("h2"), Path("g1")] and rows[1].runs == [Path("h1"), Path("h2")]
    sft, hyb, go = (r.stats for r in rows)
    assert sft["safety_rate"] == Stat(0.4, 0.0, 3)  # the before evaluations of all three runs
    assert sft["steps/truth/guard_fooled_rate"].n == 0
    assert hyb["safety_rate"].mean == pytest.approx(0.85) and hyb["safety_rate"].std == pytest.approx(0.0707107)
    assert hyb["benign_refusal_rate"].std == pytest.approx(math.sqrt(0.02))  # (0.1-0.2)^2+(0.3-0.2)^2 over 1
    assert hyb["steps/truth/guard_fooled_rate"].mean == pytest.approx(0.2)
    assert go["safety_rate"] == Stat(1.0, None, 1)
    table = comparison_table(rows).splitlines()
    assert table[0].split("|")[1:4] == [" policy     ", " runs ", " safety (guard) "]
    assert "helpfulness" not in table[0] and "judge" not in table[0]  # no run logged them
    assert "alarm" not in table[0]  # no run had an alarm
    assert [c.strip() for c in table[3].split("|")[1:-1]] == ["hybrid", "2", "0.850 ± 0.071", "0.200 ± 0.141",
                                                              "0.300 ± 0.141", "0.200 ± 0.141"]
    assert [c.strip() for c in table[4].split("|")[1:-1]] == ["guard_only", "1", "1.000", "0.600", "0.100", "0.200"]
    assert "identical in all 3 runs" in baseline_note(rows[0])
    noise = Row("SFT", [Path("a"), Path("b")], {"benign_helpfulness": Stat(-0.233, 2e-9, 2)})  # RM batching
    assert "identical in all 2 runs" in baseline_note(noise)
    differing = Row("SFT", [Path("a"), Path("b")], {"safety_rate": Stat(0.5, 0.1, 2)})
    assert baseline_note(differing).startswith("Warning: the before-training evaluations differ")


def test_subsample_even_stride_and_labels():
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": str(i)}]) for i in range(10)]
    assert [p.id for p in subsample(prompts, 4)] == ["0", "2", "5", "7"]  # strides of 2.5, floored
    assert subsample(prompts, 0) == prompts and subsample(prompts, 20) == prompts
    assert parse_policy("sft=toyworld:policy") == PolicyRef("sft", "toyworld:policy")
    assert parse_policy("runs/x/checkpoints/final") == PolicyRef("runs/x/checkpoints/final", "runs/x/checkpoints/final")
    assert parse_policy("/models/a=b") == PolicyRef("/models/a=b", "/models/a=b")
    with pytest.raises(ValueError, match="share a label"):
        check_labels([PolicyRef("a", "x"), PolicyRef("a", "y")])
    assert parse_spec("hybrid=runs/t/hybrid-s*") == ("hybrid", "runs/t/hybrid-s*")
    with pytest.raises(ValueError, match="LABEL=GLOB"):
        parse_spec("runs/t/hybrid-s*")


def test_eval_heading_states_the_sampling():
    """The table's heading names temperature and top-p: a table at top-p 0.9 is not comparable with one at 1.0."""
    settings = {"prompts": "toyworld:heldout", "samples_per_prompt": 2, "seed": 1234, "temperature": 1.0,
                "top_p": 0.9, "backend": "vllm", "guard": "toyworld:guard", "rm": None}
    heading = describe(settings, {"benign": 3, "harmful": 1})
    assert "(3 benign, 1 harmful prompts x 2 samples, seed 1234, temperature 1, top-p 0.9, vllm)" in heading
    assert heading.endswith("RM none.")
