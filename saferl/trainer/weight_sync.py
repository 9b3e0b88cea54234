"""Push the trainer's weights to every rollout engine after each update.

`WeightSync` is the interface; `BlobWeightSync` is the transport that works everywhere (CPU included): the
trainer serialises its full state dict once (safetensors, HF names, so fused modules arrive whole), Ray puts
it in the object store once, and each engine reloads it through vLLM's `reload_weights` and resets its
prefix cache. A GPU transport (NCCL broadcast, CUDA IPC handles) implements the same `push`.
"""

from __future__ import annotations

from typing import Any, Protocol


class WeightSync(Protocol):
    def push(self) -> int:
        """Send the current trainer weights to all rollout engines; returns the bytes sent per engine."""
        ...


class BlobWeightSync:
    def __init__(self, trainer: Any, rollout: Any) -> None:
        self.trainer = trainer  # ActorGroup of PolicyTrainer (one actor)
        self.rollout = rollout  # ActorGroup of RolloutWorker

    def push(self) -> int:
        blob = self.trainer.call("state_blob")[0]
        self.rollout.call("load_weights", blob)
        return len(blob)
