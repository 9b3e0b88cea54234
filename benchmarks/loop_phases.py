"""Benchmark the toy SafeRL step: time per phase, framework overhead, peak memory of the whole run.

Runs the real loop (`saferl.train.train`) on configs/toy.yaml for a few steps twice in one invocation, once
with Ray actors and once with every role in this process, and prints the medians of steps 2..N side by
side. Every figure has one definition for both executors:

- driver phases: `generate + score` (from the first generation call until every score is in), `train`,
  `sync`, `step`. Within the first, `rollout` (until the last group is generated) and `reward` (waiting for
  the scores left after it) are shown without a ratio: on Ray scoring overlaps generation, so most of it
  hides inside `rollout`, in-process it runs after it; only their sum compares like with like.
- role compute: `timing/compute/<role>`, the union of that role's model-compute intervals inside the step
  (engine generate and weight reload, guard generate, RM forward, trainer step and weight serialisation).
- framework overhead = step wall time minus the union of all roles' compute intervals: the time on the
  driver's critical path when no role is computing (`saferl.tracking.step_timing`); it cannot be negative,
  and overlapping roles count once.

Peak memory is the largest sum of RSS over this process and all its descendants (Ray daemons and actors
included), sampled every 0.2 s.

    .venv/bin/python benchmarks/loop_phases.py [--steps 5] [--out benchmarks/results/loop_phases.md]
        [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from record import recorded

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reward", "train", "sync", "step")
ROLES = ("rollout", "guard", "helpfulness", "trainer")


class TreeMemory:
    """Peak summed RSS of this process and its descendants."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self) -> TreeMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()


def run(executor: str, steps: int, overrides: list[str]) -> dict[str, float]:
    from saferl.config import load_config
    from saferl.train import train

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{executor}-"))
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"run.executor={executor}", f"trainer.steps={steps}",
                                                      f"run.dir={run_dir}", "eval.max_prompts=32",
                                                      "logging.progress=false", *overrides])
    start = time.monotonic()
    with TreeMemory() as mem:
        train(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "timing/step" in r][1:]  # the first step warms caches
    out = {p: statistics.median(r[f"timing/{p}"] for r in steps_rows) for p in PHASES}
    out["generate + score"] = statistics.median(r["timing/rollout"] + r["timing/reward"] for r in steps_rows)
    for key in ("compute", "overhead", "overhead_frac", *(f"compute/{role}" for role in ROLES)):
        out[key] = statistics.median(r[f"timing/{key}"] for r in steps_rows)
    out["peak_gib"] = mem.peak / 2**30
    out["wall_s"] = time.monotonic() - start
    out["tokens_per_s"] = statistics.median(r["rollout/tokens"] / r["timing/rollout"] for r in steps_rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="also write the output, command and date to this Markdown file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.chdir(ROOT)
    results = {ex: run(ex, args.steps, args.overrides) for ex in ("ray", "local")}
    with recorded(args.out):  # the table only, not the runs' own logs
        report(results["ray"], results["local"], args.steps, args.overrides)


def report(ray: dict[str, float], local: dict[str, float], steps: int, overrides: list[str]) -> None:
    def row(label: str, key: str, ratio: bool = True, unit: str = "9.3f") -> None:
        share = f"{ray[key] / local[key]:10.2f}x" if ratio and local[key] else f"{'-':>11s}"
        print(f"{label:34s} {ray[key]:{unit}} {local[key]:{unit}} {share}")

    print(f"\nSafeRL toy step ({' '.join(['configs/toy.yaml', *overrides])}), median of steps 2..{steps}, seconds")
    print(f"{'':34s} {'ray':>9s} {'local':>9s} {'ray/local':>11s}")
    print("driver phases (wall time)")
    row("  generate + score", "generate + score")
    row("    of which until the last group", "rollout", ratio=False)
    row("    of which waiting for scores", "reward", ratio=False)
    row("  train", "train")
    row("  sync", "sync")
    row("  step", "step")
    print("role compute (union of its intervals in the step)")
    for role in ROLES:
        row(f"  {role}", f"compute/{role}")
    row("  any role (union)", "compute")
    print("framework overhead (step - union: no role computing)")
    row("  seconds", "overhead")
    print(f"{'  fraction of the step':34s} {ray['overhead_frac']:9.1%} {local['overhead_frac']:9.1%}")
    row("rollout tokens/s (until last group)", "tokens_per_s", unit="9.0f")
    print(f"{'peak memory (GiB)':34s} {ray['peak_gib']:9.2f} {local['peak_gib']:9.2f}   goal <= 6 GiB")
    print(f"{'whole run wall (s)':34s} {ray['wall_s']:9.1f} {local['wall_s']:9.1f}")


if __name__ == "__main__":
    main()
