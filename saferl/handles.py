"""Typed handles on the role groups: the methods the driver, scoring, evaluation and checkpoints call on roles.

`ActorGroup` stays generic (it shards, calls and gathers any method by name); each handle here wraps one group
of one role class and names that class's methods once, with their argument and result types, so no caller
spells a method as a string and a renamed role method breaks in this file only. Handles are composition: they
hold their `ActorGroup` as `.group` and add nothing but types.

`Role` is the contract every role class meets (liveness for `ActorGroup`'s start-up wait, model-compute
intervals for `tracking.step_timing`); `Scorer` adds the failure counters the guard and the reward model
report each step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from saferl.actor_group import ActorGroup, Pending
from saferl.tracking import Interval
from saferl.types import GuardVerdict, ModerationItem, Prompt, Rollout, TrainBatch

Conversation = list[dict[str, str]]  # chat messages, {"role": ..., "content": ...}


@runtime_checkable
class Role(Protocol):
    """What every role class (`RolloutWorker`, `GuardScorer`, `HelpfulnessScorer`, `PolicyTrainer`, the remote
    clients) provides."""

    def ready(self) -> bool:
        """True once constructed; `ActorGroup` waits on it so constructor errors surface at start."""
        ...

    def pop_compute(self) -> list[Interval]:
        """Model compute since the last pop, as (start, end) `time.time()` intervals."""
        ...


@runtime_checkable
class Scorer(Role, Protocol):
    """A role that judges samples and counts its failures (timeouts, fallbacks, parse failures)."""

    def stats(self) -> dict[str, int]:
        """Cumulative failure counters since the actor started."""
        ...


def pop_compute(group: ActorGroup) -> list[Interval]:
    """`Role.pop_compute` of every actor of `group`, as one list."""
    return [iv for actor in group.call("pop_compute") for iv in actor]


def failure_counters(group: ActorGroup) -> dict[str, float]:
    """`Scorer.stats` summed over the actors of `group`, plus `restarts` (Ray restarts of its actors)."""
    stats = group.call("stats")
    return {**{k: float(sum(s[k] for s in stats)) for k in stats[0]}, "restarts": float(group.restarts())}


class RolloutGroup:
    """`RolloutWorker` engines; prompts are sharded over them, prompt i sampled with seed `seed + i`."""

    def __init__(self, group: ActorGroup) -> None:
        self.group = group

    @property
    def in_process(self) -> bool:
        """True when nothing runs in the background (executor `local`): streaming would only add latency."""
        return self.group.executor == "local"

    def generate(self, prompts: list[Prompt], n: int, *, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int) -> list[Rollout]:
        """`n` samples per prompt, grouped in prompt order (`RolloutWorker.generate`)."""
        return self.group.map("generate", prompts, n, offset_kwarg="first_group", temperature=temperature,
                              top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)

    def generate_stream(self, prompts: list[Prompt], n: int, *, temperature: float, top_p: float,
                        max_new_tokens: int, seed: int) -> Iterator[list[Rollout]]:
        """Each prompt's group of `n` rollouts as soon as it is finished, in completion order
        (`RolloutWorker.generate_stream`)."""
        return self.group.stream("generate_stream", prompts, n, offset_kwarg="first_group",
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)

    def load_weights(self, blob: bytes) -> None:
        """Every engine loads the same safetensors blob."""
        self.group.call("load_weights", blob)

    def packed_modules(self) -> dict[str, list[str]]:
        """The engines' fused modules ({fused name: its HF parts}; the engines are alike, the first answers)."""
        return self.group.call("packed_modules")[0]

    def begin_weight_update(self) -> None:
        self.group.call("begin_weight_update")

    def load_weight_bucket(self, bucket: Any) -> None:
        """Every engine loads one bucket: a `WeightBucket` or, on Ray, a reference to one in the object store."""
        self.group.call("load_weight_bucket", bucket)

    def finish_weight_update(self) -> None:
        self.group.call("finish_weight_update")


class GuardGroup:
    """`GuardScorer` actors, or one `RemoteGuardScorer` client."""

    def __init__(self, group: ActorGroup) -> None:
        self.group = group

    def moderate(self, items: list[ModerationItem]) -> Pending[GuardVerdict]:
        """One verdict per item, sharded over the actors; on Ray the caller goes on while they run."""
        return self.group.submit("moderate", items)


class HelpfulnessGroup:
    """`HelpfulnessScorer` actors, or one `RemoteHelpfulnessScorer` client."""

    def __init__(self, group: ActorGroup) -> None:
        self.group = group

    def score(self, pairs: list[tuple[Conversation, str]]) -> Pending[tuple[tuple[float, ...], bool]]:
        """(every member's score, helpfulness.model's first; is_fallback) per (conversation, answer), sharded
        over the actors, without waiting."""
        return self.group.submit("score_with_fallbacks", pairs)


class TrainerGroup:
    """The `PolicyTrainer` ranks of one data-parallel trainer; every call goes to every rank."""

    def __init__(self, group: ActorGroup) -> None:
        self.group = group

    def connect(self) -> None:
        """Rendezvous the ranks at rank 0's address (a single rank is ready as it is)."""
        if len(self.group) > 1:
            address = self.group.call("address")[0]
            self.group.call("connect", address)

    def train_step(self, batch: TrainBatch) -> list[dict[str, float]]:
        """One GSPO update on `batch`; each rank's metrics (`policy.merge_rank_metrics` merges them)."""
        return self.group.call("train_step", batch)

    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Per sequence, its response tokens' log-probs under the frozen starting policy
        (`PolicyTrainer.reference_logprobs`). Rank r scores sequences r, r + W, ...: the ranks share the work
        (each holds the reference), and under ZeRO-3 they must run their forwards together anyway."""
        shares = self.group.call("reference_logprobs", batch)
        out: list[list[float]] = [[] for _ in batch.input_ids]
        for rank, share in enumerate(shares):
            out[rank::len(shares)] = share
        return out

    def state_blob(self) -> bytes:
        """The full weights as a safetensors blob (every rank takes part in gathering them; rank 0's copy)."""
        return self.group.call("state_blob")[0]

    def weight_layout(self) -> list[tuple[str, int]]:
        """(HF name, bytes) of each weight to sync, in the model's order (rank 0's answer)."""
        return self.group.call("weight_layout")[0]

    def weight_bucket(self, names: list[str]) -> Any:
        """Rank 0's bucket of the weights `names` (every rank takes part in gathering them), left where it is:
        on Ray a reference into the object store, for the engines to read; in-process the `WeightBucket`."""
        results = self.group.call_later("weight_bucket", names)
        self.group.wait(results[1:])  # the other ranks' share of the gather (they answer None)
        return results[0]

    def save(self, directory: str, export: str) -> None:
        """Every rank writes its part of a checkpoint into `directory` (`export`: merged | adapter)."""
        self.group.call("save", directory, export)

    def load(self, directory: str) -> None:
        """Every rank restores its state from the checkpoint `directory`."""
        self.group.call("load", directory)
