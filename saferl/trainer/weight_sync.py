"""Push the trainer's weights to every rollout engine after each update.

`WeightSync` is the interface, with two transports that work everywhere (CPU included):

- `BucketWeightSync`, the one the driver uses: the weights travel in buckets of at most `bucket_bytes`, one
  at a time, so no second copy of the whole model exists anywhere. A bucket holds HF-named tensors in the
  model's order, never splitting one of the engine's fused modules (q, k and v of one layer, gate and up),
  which must arrive whole (`plan_buckets`); a module larger than the bucket travels alone. The trainer
  gathers only the bucket's parameters (under ZeRO-3, one bucket at a time), views them in place otherwise;
  on Ray the bucket goes from the trainer's rank 0 into the object store once and each engine reads it
  there (the driver holds a reference, never the bytes). Each engine loads it through vLLM's layerwise
  reload, into its own parameters, a layer repacked as soon as all its weights have arrived
  (`saferl.engines`). The bucket size is `trainer.sync_bucket_mb`.
- `BlobWeightSync`, the first transport, kept as the benchmark's baseline: the full state dict serialised
  into one safetensors blob, put in the object store, reloaded by each engine through `reload_weights`.

Both reset the engines' prefix caches. A GPU transport (NCCL broadcast, CUDA IPC handles) would implement the
same `push`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class WeightSync(Protocol):
    def push(self) -> int:
        """Send the current trainer weights to all rollout engines; returns the bytes sent per engine."""
        ...


class WeightSource(Protocol):
    def state_blob(self) -> bytes: ...


class WeightSink(Protocol):
    def load_weights(self, blob: bytes) -> None: ...


class BucketSource(Protocol):
    def weight_layout(self) -> list[tuple[str, int]]: ...
    def weight_bucket(self, names: list[str]) -> Any: ...


class BucketSink(Protocol):
    def packed_modules(self) -> dict[str, list[str]]: ...
    def begin_weight_update(self) -> None: ...
    def load_weight_bucket(self, bucket: Any) -> None: ...
    def finish_weight_update(self) -> None: ...


class BlobWeightSync:
    """`trainer` and `rollout` are the `saferl.handles` TrainerGroup and RolloutGroup (this package stays below
    the roles layer, so it names only the one method it calls on each)."""

    def __init__(self, trainer: WeightSource, rollout: WeightSink) -> None:
        self.trainer, self.rollout = trainer, rollout

    def push(self) -> int:
        blob = self.trainer.state_blob()
        self.rollout.load_weights(blob)
        return len(blob)


def engine_module(name: str, packed: Mapping[str, Sequence[str]]) -> str:
    """The engine module the HF tensor `name` loads into: its parent module, or the fused module that
    `packed` ({fused: [parts]}) makes of it.

    >>> engine_module("model.layers.0.self_attn.k_proj.weight", {"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    'model.layers.0.self_attn.qkv_proj'
    """
    module = name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts:
            return f"{parent}.{fused}" if parent else fused
    return module


def plan_buckets(layout: Sequence[tuple[str, int]], bucket_bytes: int,
                 packed: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Cut `layout` ((name, bytes) in model order) into consecutive buckets of at most `bucket_bytes`, never
    splitting an engine module (the tensors `engine_module` maps to one name, wherever they sit in the
    order, travel together, at the first one's place). A module larger than `bucket_bytes` is a bucket alone.

    Returns the names of each bucket, every name exactly once.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    modules: dict[str, tuple[list[str], list[int]]] = {}
    for name, size in layout:
        names, sizes = modules.setdefault(engine_module(name, packed), ([], []))
        names.append(name)
        sizes.append(size)
    buckets: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for names, sizes in modules.values():
        size = sum(sizes)
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current = current + names
        filled += size
    if current:
        buckets.append(current)
    return buckets


class BucketWeightSync:
    """`trainer` and `rollout` are the `saferl.handles` TrainerGroup and RolloutGroup. The bucket plan is made
    once, from the trainer's layout and the engines' fused modules."""

    def __init__(self, trainer: BucketSource, rollout: BucketSink, bucket_bytes: int) -> None:
        self.trainer, self.rollout, self.bucket_bytes = trainer, rollout, bucket_bytes
        self.plan: list[list[str]] | None = None
        self.total = 0

    def push(self) -> int:
        if self.plan is None:
            layout = self.trainer.weight_layout()
            self.plan = plan_buckets(layout, self.bucket_bytes, self.rollout.packed_modules())
            self.total = sum(size for _, size in layout)
        self.rollout.begin_weight_update()
        for names in self.plan:
            # The bucket is dropped before the next is made: at most one exists at a time.
            self.rollout.load_weight_bucket(self.trainer.weight_bucket(names))
        self.rollout.finish_weight_update()
        return self.total
