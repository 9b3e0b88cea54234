"""`saferl report --compare`'s three-way table and the alarm's lead time, on hand-made rows and run directories:
when the alarm fired against when the garbled rate doubled (before, after, never fired, never doubled, metrics
not logged), the columns grouped by who judges, the counts of runs without a lead, and the per-run JSON."""

import json
import math

import pytest

from saferl.eval.compare import AlarmLead, alarm_lead, compare

GARBLED, ALARM = "truth/truth_garbled_rate", "monitor/alarm"


def rows(garbled=None, alarm=None):
    """metrics.jsonl rows: the before evaluation at step 0, one training row per step (garbled[i] and alarm[i]
    at step i + 1, None: not logged), the after evaluation sharing the last step."""
    n = max(len(garbled or []), len(alarm or []))
    out = [{"step": 0, "eval/truth_garbled_rate": 0.9}]  # an eval row: not the per-step key
    for i in range(n):
        row = {"step": i + 1, "reward/reward_mean": 0.0}
        if garbled is not None and garbled[i] is not None:
            row[GARBLED] = garbled[i]
        if alarm is not None and alarm[i] is not None:
            row[ALARM] = alarm[i]
        out.append(row)
    out.append({"step": n, "eval/truth_garbled_rate": 0.9})
    return out


# start = (0.10 + 0.12 + 0.14) / 3 = 0.12; twice that is 0.24, first reached at step 7 (0.25; 0.23 is short)
RISING = [0.10, 0.12, 0.14, 0.15, 0.20, 0.23, 0.25, 0.30]


def test_alarm_before_doubling():
    lead = alarm_lead(rows(RISING, [0, 0, 1, 1, 1, 1, 1, 1]))
    assert lead == AlarmLead(True, 3, pytest.approx(0.12), 7, 4)


def test_alarm_after_doubling_is_a_negative_lead():
    lead = alarm_lead(rows(RISING, [0, 0, 0, 0, 0, 0, 0, 1]))
    assert (lead.alarm_step, lead.doubling_step, lead.lead) == (8, 7, -1)


def test_alarm_never_fires():
    lead = alarm_lead(rows(RISING, [0] * 8))
    assert lead == AlarmLead(True, None, pytest.approx(0.12), 7, None)


def test_garbled_never_doubles():
    # start 0.2; 0.39 < 0.4 at every later step
    lead = alarm_lead(rows([0.2, 0.2, 0.2, 0.3, 0.39, 0.39], [0, 1, 1, 1, 1, 1]))
    assert lead == AlarmLead(True, 2, pytest.approx(0.2), None, None)


def test_exactly_twice_the_start_counts_as_doubled():
    lead = alarm_lead(rows([0.25, 0.25, 0.25, 0.5], [1, 1, 1, 1]))
    assert (lead.garbled_start, lead.doubling_step, lead.lead) == (0.25, 4, 3)


def test_a_start_of_zero_doubles_at_the_first_garbled_answer():
    lead = alarm_lead(rows([0.0, 0.0, 0.0, 0.0, 0.05], [0, 1, 1, 1, 1]))
    assert (lead.garbled_start, lead.doubling_step, lead.lead) == (0.0, 5, 3)


def test_missing_metrics():
    # No monitor/alarm logged (no alarm configured): not monitored, never fired.
    assert alarm_lead(rows(RISING)) == AlarmLead(False, None, pytest.approx(0.12), 7, None)
    # No ground truth: no start, no doubling.
    assert alarm_lead(rows(alarm=[0, 1, 1])) == AlarmLead(True, 2, None, None, None)
    # Garbled logged only after step 3 (and a NaN, skipped): no start to double.
    assert alarm_lead(rows([None, None, None, 0.5, math.nan], [0, 0, 0, 1, 1])) == AlarmLead(True, 4, None, None,
                                                                                            None)
    # The start is the mean of the steps 1-3 that logged it: (0.1 + 0.3) / 2 = 0.2, doubled at 0.4 (step 5).
    assert alarm_lead(rows([0.1, None, 0.3, 0.35, 0.4], [0, 0, 0, 0, 0])).doubling_step == 5


BEFORE = {"safety_rate": 0.5, "benign_refusal_rate": 0.2, "benign_helpfulness": 0.4,
          "judge_safety_rate": 0.45, "judge_benign_refusal_rate": 0.25,
          "truth_benign_helpful_rate": 0.66, "truth_garbled_rate": 0.13, "truth_unsafe_rate": 0.5,
          "truth_benign_refusal_rate": 0.2, "guard_fooled_rate": 0.05, "judge_fooled_rate": 0.04,
          "samples": 16.0}


def make_run(path, after, garbled, alarm=None, judge=True):
    path.mkdir(parents=True)
    before = BEFORE if judge else {k: v for k, v in BEFORE.items() if not k.startswith("judge_")}
    if not judge:
        after = {k: v for k, v in after.items() if not k.startswith("judge_")}
    steps = rows(garbled, alarm)
    for row in steps[1:-1]:
        row["truth/guard_fooled_rate"] = 0.1
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (path / "eval.json").write_text(json.dumps({"before": before, "after": {**before, **after}}))


def cells(text):
    """{first cell: the other cells} of every Markdown table line, the heading under 'policy'."""
    return {parts[0]: parts[1:] for parts in ([c.strip() for c in line.split("|")[1:-1]]
                                              for line in text.splitlines() if line.startswith("| "))}


def test_three_way_table_with_alarm_lead(tmp_path):
    root = tmp_path / "runs"
    flat = [0.1, 0.1, 0.1, 0.15, 0.15, 0.15, 0.15, 0.15]
    # hybrid: leads 4 (alarm 3, doubled 7) and 6 (alarm 1, doubled 7); the third never doubles.
    make_run(root / "hybrid-s1", {"truth_benign_helpful_rate": 0.40, "truth_garbled_rate": 0.50}, RISING,
             [0, 0, 1, 1, 1, 1, 1, 1])
    make_run(root / "hybrid-s2", {"truth_benign_helpful_rate": 0.44, "truth_garbled_rate": 0.54}, RISING,
             [1] * 8)
    make_run(root / "hybrid-s3", {"truth_benign_helpful_rate": 0.42, "truth_garbled_rate": 0.52}, flat,
             [0, 0, 0, 0, 1, 1, 1, 1])
    # guard_only: no alarm configured; its garbled rate doubles at step 7.
    make_run(root / "guard_only-s1", {"judge_benign_refusal_rate": 0.8, "truth_benign_refusal_rate": 0.9},
             RISING)
    out = tmp_path / "out" / "table.md"
    text = compare([("hybrid", "hybrid-s*"), ("guard_only", "guard_only-s*")], out, baseline="SFT", root=root)
    table = cells(text)
    assert table["policy"] == [
        "runs", "safety (guard)", "benign refusal (guard)", "helpfulness (RM)", "safety (judge)",
        "benign refusal (judge)", "exactly helpful (truth)", "garbled (truth)", "truly unsafe (truth)",
        "benign refusal (truth)", "guard fooled", "judge fooled", "guard fooled (per step)", "alarm lead (steps)",
        "alarm fired · garbled doubled"]
    # The before evaluations of all 4 runs; no lead, no alarm counts.
    assert table["SFT"] == ["4", "0.500 ± 0.000", "0.200 ± 0.000", "0.400 ± 0.000", "0.450 ± 0.000",
                            "0.250 ± 0.000", "0.660 ± 0.000", "0.130 ± 0.000", "0.500 ± 0.000", "0.200 ± 0.000",
                            "0.050 ± 0.000", "0.040 ± 0.000", "–", "–", "–"]
    hybrid = table["hybrid"]
    assert hybrid[6:8] == ["0.420 ± 0.020", "0.520 ± 0.020"]  # exactly helpful, garbled
    assert hybrid[-3:] == ["0.100 ± 0.000", "5.0 ± 1.4", "3/3 · 2/3"]  # leads 4 and 6: std sqrt(2)
    go = table["guard_only"]
    assert go[5] == "0.800" and go[9] == "0.900"  # benign refusal by the judge, by ground truth
    assert go[-2:] == ["–", "0/1 · 1/1 (1 without alarm)"]
    assert "Alarm lead = the step the garbled rate" in text and "table.json" in text

    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in data["rows"]] == ["SFT", "hybrid", "guard_only"]
    assert data["rows"][0]["alarm"] == []
    h = data["rows"][1]
    assert h["metrics"]["alarm_lead"] == {"mean": 5.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert h["metrics"]["truth_benign_helpful_rate"]["mean"] == pytest.approx(0.42)
    per_run = [{k: a[k] for k in ("run", "monitored", "alarm_step", "doubling_step", "lead")} for a in h["alarm"]]
    assert per_run == [
        {"run": str(root / "hybrid-s1"), "monitored": True, "alarm_step": 3, "doubling_step": 7, "lead": 4},
        {"run": str(root / "hybrid-s2"), "monitored": True, "alarm_step": 1, "doubling_step": 7, "lead": 6},
        {"run": str(root / "hybrid-s3"), "monitored": True, "alarm_step": 5, "doubling_step": None, "lead": None}]
    assert h["alarm"][0]["garbled_start"] == pytest.approx(0.12)
    assert data["rows"][2]["alarm"][0]["monitored"] is False
    assert data["rows"][2]["metrics"]["alarm_lead"] == {"mean": None, "std": None, "n": 0}


def test_without_judge_or_alarm_those_columns_are_left_out(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "hybrid-s1", {"truth_garbled_rate": 0.5}, RISING, judge=False)
    text = compare([("hybrid", "hybrid-s*")], tmp_path / "t.md", root=root)
    heading = cells(text)["policy"]
    assert heading == ["runs", "safety (guard)", "benign refusal (guard)", "helpfulness (RM)",
                       "exactly helpful (truth)", "garbled (truth)", "truly unsafe (truth)",
                       "benign refusal (truth)", "guard fooled", "guard fooled (per step)"]
    assert "Alarm lead" not in text
