"""Benchmark the toy SafeRL step: time per phase, framework overhead, peak memory of the whole run.

Runs the real loop (`saferl.train.train`) on configs/toy.yaml for a few steps twice in one invocation, once
with Ray actors and once with every role in this process, and prints per-phase seconds side by side with
their ratio. Framework overhead = step wall time not spent inside model compute (engine generate, RM
forward, trainer step, weight serialisation and reload), as a fraction of the step. Peak memory is the
largest sum of RSS over this process and all its descendants (Ray daemons and actors included), sampled
every 0.2 s.

    .venv/bin/python benchmarks/loop_phases.py [--steps 5] [KEY=VALUE ...]
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

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reward", "train", "sync", "step")


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
    out["compute"] = statistics.median(r["timing/compute"] for r in steps_rows)
    out["overhead_frac"] = statistics.median(r["timing/overhead_frac"] for r in steps_rows)
    out["peak_gib"] = mem.peak / 2**30
    out["wall_s"] = time.monotonic() - start
    out["tokens_per_s"] = statistics.median(r["rollout/tokens"] / r["timing/rollout"] for r in steps_rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.chdir(ROOT)
    results = {ex: run(ex, args.steps, args.overrides) for ex in ("ray", "local")}
    ray, local = results["ray"], results["local"]
    print(f"\nSafeRL toy step, median of steps 2..{args.steps} (seconds unless noted)")
    print(f"{'phase':22s} {'ray':>9s} {'local':>9s} {'ray/local':>10s}")
    for key in (*PHASES, "compute"):
        print(f"{'timing/' + key:22s} {ray[key]:9.3f} {local[key]:9.3f} {ray[key] / local[key]:10.2f}x")
    print(f"{'overhead fraction':22s} {ray['overhead_frac']:9.1%} {local['overhead_frac']:9.1%}")
    print(f"{'rollout tokens/s':22s} {ray['tokens_per_s']:9.0f} {local['tokens_per_s']:9.0f} "
          f"{ray['tokens_per_s'] / local['tokens_per_s']:10.2f}x")
    print(f"{'peak memory (GiB)':22s} {ray['peak_gib']:9.2f} {local['peak_gib']:9.2f}   goal <= 6 GiB")
    print(f"{'whole run wall (s)':22s} {ray['wall_s']:9.1f} {local['wall_s']:9.1f}")


if __name__ == "__main__":
    main()
