"""Metrics sinks and step timing: metrics.jsonl in the run directory, W&B by config, a console progress bar.

`metrics.jsonl` gets one JSON object per step, flushed at once, so a crash loses nothing already logged.
W&B runs `disabled`, `offline` (no key needed; `wandb sync` later) or `online`.

Framework overhead (`step_timing`): the roles report their model compute as (start, end) wall-clock intervals
(`time.time()`, comparable across the processes of one node); the step's overhead is its wall time minus the
length of the union of those intervals, i.e. the time when no role was computing. Overlapping roles (scoring
during generation on Ray) are counted once. On a multi-node cluster the nodes' clocks may disagree by the
NTP skew (usually milliseconds), which shifts the intervals of the other nodes by that much.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class PhaseTimer:
    """Wall-clock seconds per named phase; `with timer.phase("rollout"): ...` accumulates into `timing/rollout`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


Interval = tuple[float, float]  # (start, end) in time.time() seconds


def union_seconds(intervals: Iterable[Interval], window: Interval) -> float:
    """Length of the union of `intervals`, each first cut to `window`: time covered by at least one of them."""
    lo, hi = window
    cut = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, end = 0.0, -math.inf
    for a, b in cut:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def step_timing(window: Interval, compute: dict[str, list[Interval]]) -> dict[str, float]:
    """The step's wall time, model compute and framework overhead from each role's compute intervals.

    `timing/compute/<role>` is the time that role computed during the step (its actors' intervals united, so
    parallel actors count once), `timing/compute` the time any role computed, `timing/overhead` the rest of
    the step: the driver's critical path with every role idle (dispatch, serialisation, waiting, Python).
    """
    step = window[1] - window[0]
    busy = union_seconds([iv for ivs in compute.values() for iv in ivs], window)
    return {"timing/step": step, "timing/compute": busy, "timing/overhead": step - busy,
            "timing/overhead_frac": (step - busy) / step if step > 0 else 0.0,
            **{f"timing/compute/{role}": union_seconds(ivs, window) for role, ivs in compute.items()}}


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl row; a line torn by a kill mid-write counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class Tracker:
    """Writes metrics to `<run_dir>/metrics.jsonl`, to W&B (by mode) and to a tqdm bar with ETA.

    `start_step` > 0 continues a resumed run: rows logged after that step by the interrupted run are dropped,
    so every step appears once.
    """

    def __init__(self, run_dir: Path, *, total_steps: int, wandb_mode: str, project: str,
                 config: dict[str, Any], progress: bool, start_step: int = 0) -> None:
        path = run_dir / "metrics.jsonl"
        if start_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            # A stable id per run directory lets a resumed run continue the same W&B run.
            run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
            self.wandb = wandb.init(project=project, mode=wandb_mode, dir=str(run_dir), config=config,
                                    name=run_dir.name, id=run_id, resume="allow")
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)
        if self.bar is not None and advance:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward/reward_mean", "reward/unsafe_rate",
                                                                    "reward/refusal_rate") if k in metrics})

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()
