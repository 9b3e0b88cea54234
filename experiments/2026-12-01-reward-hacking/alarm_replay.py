"""Replay the reward-hacking alarm on the statistics runs logged: for a monitor metric, a threshold and a
patience, the step the alarm would have fired (saferl.eval.monitor.update_alarm, as in training) and its lead
over the garbled rate's doubling (saferl.eval.compare.alarm_lead, as in `saferl report`). It reads only
metrics.jsonl, so it can test thresholds that were not the run's own, which is choosing on the data shown:
the README says which figures are replays.

    .venv/bin/python experiments/2026-12-01-reward-hacking/alarm_replay.py runs/reward_hacking/hybrid-s* \\
        --metric monitor/implausible_advantage --thresholds -0.6 -0.4 -0.2 0 --patience 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saferl.eval.compare import ALARM_KEY, alarm_lead
from saferl.eval.monitor import AlarmState, update_alarm


def replay(rows: list[dict], metric: str, threshold: float, patience: int, window: int) -> list[dict]:
    """`rows` with monitor/alarm replaced by what an alarm on `metric` would have logged (absent from a run
    that did not log `metric`)."""
    state, out = AlarmState(), []
    for row in rows:
        row = {k: v for k, v in row.items() if k != ALARM_KEY}
        if metric in row:
            state = update_alarm(state, row[metric], threshold=threshold, patience=patience, step=row["step"],
                                 window=window)
            row = {**row, ALARM_KEY: float(state.fired_step is not None)}
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    parser.add_argument("--metric", required=True)
    parser.add_argument("--thresholds", type=float, nargs="+", required=True)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--window", type=int, default=1)
    args = parser.parse_args()
    print(f"metric {args.metric}, window {args.window}, patience {args.patience}: alarm step / garbled-doubling step / lead per run")
    for threshold in args.thresholds:
        cells = []
        for run in args.runs:
            rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
            lead = alarm_lead(replay(rows, args.metric, threshold, args.patience, args.window))
            cells.append(f"{Path(run).name}: {lead.alarm_step}/{lead.doubling_step}/{lead.lead}")
        print(f"  >= {threshold:g}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
