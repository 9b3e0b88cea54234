"""The toy world's build schedule, old against new, one after the other on the same machine: the core build
(policy, guard, RM, held-out evaluation) and the time until its Stream guard is ready.

- new: this checkout's `ensure_built(cfg, stream_guard=True)` (the guard side also trains the Stream guard
  while the worker trains the RM; the evaluation split across the two processes), as the tests' fixture and
  `saferl toyworld build` use it;
- old: `--old-rev`'s saferl package (`git archive`, default 12f5a12: guard here, policy then RM in the worker,
  evaluation in one process, then `ensure_toy_stream` after the world).

Each side builds the default world (configs/toy.yaml's toyworld section) from scratch into its own cache under
--dir (never .cache/toyworld), in its own process. Prints both sides' wall times and ratios, the load average
while each ran, and checks that each side's metrics.json (but build_seconds) equals --reference's and that
every model's weights (policy, guard, reward_model, stream_guard: model.safetensors by SHA-256) equal them.
Exits 1 when a check fails.

    PYTHONPATH=. .venv/bin/python benchmarks/toyworld_build_schedule.py --dir /tmp/saferl_tw_schedule
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from record import sampled_load

ROOT = Path(__file__).resolve().parents[1]
# Each side prints CORE <seconds> when the core world is built and STREAM <seconds> when its Stream guard is.
NEW = ("import time; t = time.monotonic(); from saferl.config import load_config; "
       "from saferl.toyworld.build import ensure_built; from saferl.toyworld.stream import ensure_toy_stream; "
       "cfg = load_config({config!r}).toyworld; cfg.cache_dir = {cache!r}; "
       "root = ensure_built(cfg, stream_guard=True).root; print('CORE', time.monotonic() - t, flush=True); "
       "ensure_toy_stream(root); print('STREAM', time.monotonic() - t, flush=True)")
OLD = NEW.replace("ensure_built(cfg, stream_guard=True)", "ensure_built(cfg)")
WEIGHTS = ("policy", "guard", "reward_model", "stream_guard")


def run_side(name: str, code: str, pythonpath: str, base: Path) -> dict:
    cache = base / name
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    with sampled_load() as loads:
        # cwd too: `python -c` puts the working directory ahead of PYTHONPATH on sys.path
        env = dict(os.environ, PYTHONPATH=pythonpath)
        start = time.monotonic()
        out = base / f"{name}.stdout"
        with open(base / f"{name}.log", "w") as log, open(out, "w") as stdout:
            code = code.format(cache=str(cache), config=str(ROOT / "configs/toy.yaml"))
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=pythonpath, env=env,
                                    stdout=stdout, stderr=log, text=True)
            # CPU seconds of the build and of its reaped worker: what it ran, as against what it waited
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
    marks = {line.split()[0]: float(line.split()[1]) for line in out.read_text().splitlines()
             if line.split()[:1] in (["CORE"], ["STREAM"])}
    found = list(cache.glob("*/metrics.json"))
    ran = "this process's side" in out.read_text()  # a line only the new schedule prints
    if ran != (name == "new"):
        raise SystemExit(f"the {name} side ran the {'new' if ran else 'old'} schedule's code; see {out}")
    return {"rc": os.waitstatus_to_exitcode(status), "wall": wall, "core": marks.get("CORE"),
            "stream": marks.get("STREAM"), "cpu": usage.ru_utime + usage.ru_stime,
            "root": found[0].parent if len(found) == 1 else None, "loads": loads}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/saferl_tw_schedule", help="scratch directory for the caches")
    parser.add_argument("--old-rev", default="12f5a12", help="the commit whose saferl package is the old side")
    parser.add_argument("--reference", default=str(ROOT / ".cache/toyworld/931b592f800c"),
                        help="a built world (with its Stream guard) whose metrics and weights both sides must equal")
    parser.add_argument("--sides", default="new,old", help="which sides to run, in this order")
    args = parser.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    old_src = base / "old_src"
    shutil.rmtree(old_src, ignore_errors=True)
    old_src.mkdir()
    archive = subprocess.run(["git", "archive", args.old_rev, "saferl"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    sides = {"new": (NEW, str(ROOT)), "old": (OLD, str(old_src))}
    results = {}
    for name in args.sides.split(","):
        results[name] = run_side(name, *sides[name], base)
        r = results[name]
        print(f"{name}: rc {r['rc']}, core {r['core']}, stream {r['stream']}", flush=True)
    reference = Path(args.reference)
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    ok = True
    print(f"# toyworld build schedule (finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, sides run one after the other)")
    print(f"{'side':5s} {'core s':>8s} {'build_seconds':>14s} {'stream ready s':>15s} {'CPU s':>8s}"
          "   load avg (1 min) min-max, median")
    for name, r in results.items():
        loads = sorted(r["loads"]) or [0.0]
        metrics = json.loads((r["root"] / "metrics.json").read_text()) if r["root"] else {}
        print(f"{name:5s} {r['core'] or float('nan'):8.1f} {metrics.get('build_seconds', float('nan')):14.1f} "
              f"{r['stream'] or float('nan'):15.1f} {r['cpu']:8.1f}   {loads[0]:.1f}-{loads[-1]:.1f}, "
              f"{loads[len(loads) // 2]:.1f}")
    if {"new", "old"} <= set(results) and all(results[s]["core"] and results[s]["stream"] for s in ("new", "old")):
        new, old = results["new"], results["old"]
        print(f"ratio old/new: core {old['core'] / new['core']:.2f}x, stream ready {old['stream'] / new['stream']:.2f}x")
    for name, r in results.items():
        if r["rc"] != 0 or r["root"] is None:
            print(f"{name}: FAILED (rc {r['rc']}); see {base / name}.log")
            ok = False
            continue
        metrics = json.loads((r["root"] / "metrics.json").read_text())
        differ = sorted(k for k in set(metrics) | set(ref_metrics)
                        if k != "build_seconds" and metrics.get(k) != ref_metrics.get(k))
        same_order = [k for k in metrics if k != "build_seconds"] == [k for k in ref_metrics if k != "build_seconds"]
        print(f"{name}: metrics.json equals the reference's (but build_seconds): {not differ}"
              f"{'' if not differ else ' -- differ: ' + ', '.join(differ)}; same key order: {same_order}")
        ok &= not differ
        for part in WEIGHTS:
            a, b = r["root"] / part / "model.safetensors", reference / part / "model.safetensors"
            same = a.is_file() and b.is_file() and sha(a) == sha(b)
            print(f"{name}: {part}/model.safetensors identical to the reference's: {same}"
                  f"{'' if not a.is_file() else ' (' + sha(a)[:12] + ')'}")
            ok &= same
    print("all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
