"""Push the trainer's weights to every rollout engine after each update.

`WeightSync` is the interface; `BlobWeightSync` is the transport that works everywhere (CPU included): the
trainer serialises its full state dict once (safetensors, HF names, so fused modules arrive whole), Ray puts
it in the object store once, and each engine reloads it through vLLM's `reload_weights` and resets its
prefix cache. A GPU transport (NCCL broadcast, CUDA IPC handles) implements the same `push`.
"""

from __future__ import annotations

from typing import Protocol


class WeightSync(Protocol):
    def push(self) -> int:
        """Send the current trainer weights to all rollout engines; returns the bytes sent per engine."""
        ...


class WeightSource(Protocol):
    def state_blob(self) -> bytes: ...


class WeightSink(Protocol):
    def load_weights(self, blob: bytes) -> None: ...


class BlobWeightSync:
    """`trainer` and `rollout` are the `saferl.handles` TrainerGroup and RolloutGroup (this package stays below
    the roles layer, so it names only the one method it calls on each)."""

    def __init__(self, trainer: WeightSource, rollout: WeightSink) -> None:
        self.trainer, self.rollout = trainer, rollout

    def push(self) -> int:
        blob = self.trainer.state_blob()
        self.rollout.load_weights(blob)
        return len(blob)
