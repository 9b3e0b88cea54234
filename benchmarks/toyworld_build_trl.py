"""The toy world's core build (policy, guard, RM, held-out evaluation) through the hand-written loop against
TRL (`saferl toyworld build --trainer trl`: trl.SFTTrainer and transformers.Trainer with SafeRL's batches and
heads, `saferl.sft_batched`), both sides started at once so they share the machine's load.

Each side builds from scratch into its own cache directory under --dir (never .cache/toyworld) in its own
process. Prints both build times and their ratio, the load average while they ran, and the held-out metrics side
by side with their targets. Exits 1 when the TRL build misses a target (evaluate.TARGETS), or when it is below
the hand-written one on guard Safety-line accuracy or on an RM ranking accuracy by more than --tolerance.

    .venv/bin/python benchmarks/toyworld_build_trl.py --dir /tmp/saferl_tw_bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from record import sampled_load

SIDES = ("saferl", "trl")
BUILD = ("from saferl.config import ToyWorldConfig; from saferl.toyworld.build import build; "
         "build(ToyWorldConfig(cache_dir={cache!r}), {trainer!r})")
# Metrics the TRL build must not lose (the "guard Safety-line accuracy, RM ranking accuracy").
COMPARED = ("guard_safety_acc", "guard_refusal_acc", "guard_category_acc", "rm_helpful_over_refusal",
            "rm_safe_completion_over_refusal", "rm_helpful_over_off_topic", "rm_helpful_over_garbled")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/saferl_tw_bench", help="scratch directory for the two caches")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="how far below the hand-written build a compared metric may fall (sampling noise)")
    args = parser.parse_args()
    base = Path(args.dir)
    with sampled_load() as loads:
        procs, starts, ends = {}, {}, {}
        for side in SIDES:
            cache = base / side
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            log = open(base / f"{side}.log", "w")
            starts[side] = time.monotonic()
            procs[side] = subprocess.Popen([sys.executable, "-c", BUILD.format(cache=str(cache), trainer=side)],
                                           stdout=log, stderr=subprocess.STDOUT)
        cpu = {}  # CPU seconds of a build's processes (its own and its worker's): what it ran, not what it waited
        while len(ends) < len(SIDES):
            for side, proc in procs.items():
                if side not in ends:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        ends[side], proc.returncode = time.monotonic(), os.waitstatus_to_exitcode(status)
                        cpu[side] = usage.ru_utime + usage.ru_stime
            time.sleep(1)
    metrics = {}
    for side in SIDES:
        found = list((base / side).glob("*/metrics.json"))
        if len(found) != 1:  # a world that misses a target is cached before the build raises: compared below
            print(f"{side}: build failed (rc {procs[side].returncode}); see {base / side}.log")
            return 1
        metrics[side] = json.loads(found[0].read_text())
    from saferl.toyworld.evaluate import TARGETS, missed_targets

    wall = {side: ends[side] - starts[side] for side in SIDES}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# toyworld build: hand-written loop vs TRL (started together; finished {when})")
    print(f"load average (1 min) while building: {min(loads, default=0):.1f}-{max(loads, default=0):.1f}, "
          f"median {sorted(loads)[len(loads) // 2] if loads else 0:.1f} (2 CPUs)")
    print(f"{'':34}{'saferl':>10}{'trl':>10}")
    for side_key in ("build_seconds",):
        print(f"{side_key:34}{metrics['saferl'][side_key]:>10.1f}{metrics['trl'][side_key]:>10.1f}")
    print(f"{'process wall seconds':34}{wall['saferl']:>10.1f}{wall['trl']:>10.1f}")
    print(f"{'CPU seconds (build + its worker)':34}{cpu['saferl']:>10.1f}{cpu['trl']:>10.1f}"
          f"   ratio {cpu['trl'] / cpu['saferl']:.2f}x")
    ratio = metrics["trl"]["build_seconds"] / metrics["saferl"]["build_seconds"]
    print(f"TRL / hand-written build time: {ratio:.2f}x")
    print(f"\n{'held-out metric':34}{'saferl':>10}{'trl':>10}   target")
    keys = [k for k in metrics["saferl"] if isinstance(metrics["saferl"][k], float) and k != "build_seconds"]
    for key in keys:
        lo_hi = TARGETS.get(key)
        target = f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}" if lo_hi else ""
        print(f"{key:34}{metrics['saferl'][key]:>10.4f}{metrics['trl'].get(key, float('nan')):>10.4f}   {target}")
    failures = [f"misses {m}" for m in missed_targets(metrics["trl"])]
    failures += [f"{k} {metrics['trl'][k]:.4f} < {metrics['saferl'][k]:.4f} - {args.tolerance}" for k in COMPARED
                 if metrics["trl"][k] < metrics["saferl"][k] - args.tolerance]
    for line in failures:
        print(f"CHECK FAILED: trl {line}")
    print("check: " + ("FAILED" if failures else "TRL build meets every target and every compared metric"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
