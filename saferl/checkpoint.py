"""Resumable checkpoints of a run: atomic checkpoint directories, a `latest` pointer, keep-last-N pruning.

Layout under `<run.dir>/checkpoints/`:

    step_10/                 an HF model at the top level (config.json, *.safetensors, tokenizer; with LoRA and
                             checkpoint.lora_export=adapter: the peft adapter), loadable by from_pretrained/vLLM
    step_10/trainer/         engine state (weights, optimizer; DeepSpeed shards) + rank<r>.pt (RNG, step)
    step_10/saferl_state.json  driver state: step, prompt-sampler position, trainer world size
    final/                   the same at the last step
    latest                   a one-line file naming the newest complete checkpoint

Atomicity: every rank writes into `.<name>.incomplete/`; only when all have returned and the driver state is
written is it renamed into place, and only then is `latest` replaced (write + os.replace). A kill at any
moment leaves `latest` naming a complete checkpoint, and a leftover `.incomplete` directory is ignored and
cleared by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from saferl.handles import TrainerGroup

STATE_FILE = "saferl_state.json"


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save(run_dir: Path, name: str, trainer: TrainerGroup, state: dict[str, Any], keep_last: int,
         export: str) -> Path:
    """Write checkpoint `name` (every trainer rank saves its part), point `latest` at it, prune old steps.

    Args:
        trainer: the PolicyTrainer ranks.
        state: the driver's state (JSON-serialisable), stored as saferl_state.json.
        keep_last: step_* checkpoints to keep (0 keeps all); `final` and the newest are never pruned.
        export: `merged` or `adapter` (LoRA only) for the HF export at the top level.
    """
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".*.incomplete"):  # from saves a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    partial = root / f".{name}.incomplete"
    trainer.save(str(partial.resolve()), export)
    (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
    final = root / name
    if final.exists():  # re-saving a name: move the old one out of the way first, never delete it in place
        stale = root / f".{name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
    partial.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    shutil.rmtree(root / f".{name}.stale", ignore_errors=True)
    if keep_last:
        steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        for old in steps[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = checkpoints_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint "
                                f"(no {STATE_FILE}); remove {pointer} to start over")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())
