"""The run's Ray placement group: every role's bundles reserved at once, each actor scheduled into its own.

Why: actors placed one by one, first-fit, fragment small nodes. On two nodes of 1 CPU each the toy roles
(1.875 CPUs) fit, but the rollout engines and scorers landed so that no node kept the trainer's 0.5 CPU, and
the run waited 600 s for it. A placement group is placed whole or not at all, before any actor starts, by
Ray's packing (`ray.placement_strategy`), within `ray.placement_timeout_s`. When it is not placed, the group
is removed and `PlacementError` names the bundles that a first-fit packing of the nodes' free resources
could not place (`saferl.placement.first_fit`), every node's free and total CPUs and GPUs, and the config
keys to change. A restarted actor (`max_restarts`, the scorers) goes back into its own bundle, which holds
exactly what it asks for; if its node dies, Ray moves the bundle to a node with room, and the actor with it.

Shortcut: per-node free resources come from `ray._private.state` (Ray has no public per-node view without
the dashboard); Ray is pinned in requirements/cpu.lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from saferl.actor_group import PlacementError
from saferl.placement import Bundle, RoleSpec, bundles, first_fit

# The keys that set each role's resources per actor, named in the error.
RESOURCE_KEYS = {"rollout": "rollout.cpus_per_engine / rollout.gpus_per_engine",
                 "guard": "guard.cpus_per_actor / guard.gpus_per_actor",
                 "helpfulness": "helpfulness.cpus_per_actor / helpfulness.gpus_per_actor",
                 "trainer": "trainer.cpus / trainer.gpus", "judge": "eval.judge.cpus_per_actor / .gpus_per_actor"}


@dataclass(frozen=True)
class Node:
    """One alive Ray node: id, address, and its total and free resources ("CPU", "GPU")."""

    node_id: str
    address: str
    total: dict[str, float]
    free: dict[str, float]

    def describe(self) -> str:
        return f"node {self.node_id[:8]} ({self.address}): " + ", ".join(
            f"{k} {self.free.get(k, 0.0):g} free of {self.total.get(k, 0.0):g}" for k in ("CPU", "GPU"))


class Reservation:
    """The run's placement group (None when no actor holds resources, e.g. `run.executor: local`) and where
    each actor's bundle is in it."""

    def __init__(self, group: Any, wanted: list[Bundle]) -> None:
        self.group = group
        self.index = {b.label(): i for i, b in enumerate(wanted)}

    def scheduling(self, spec: RoleSpec) -> list[Any] | None:
        """One Ray scheduling strategy per actor of `spec` (into its bundle), or None when it has no bundles."""
        if self.group is None or f"{spec.role}[0]" not in self.index:
            return None
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return [PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                 placement_group_bundle_index=self.index[f"{spec.role}[{rank}]"])
                for rank in range(spec.actors)]

    def release(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, with their total and free CPUs and GPUs."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"]), dict(free.get(n["NodeID"], {})))
            for n in ray.nodes() if n["Alive"]]


def reserve(specs: list[RoleSpec], strategy: str, timeout_s: float) -> Reservation:
    """Reserve one bundle per Ray actor of `specs` as one placement group and wait until Ray has placed it
    (prints where each bundle went). Raises PlacementError, after removing the group, when it is not placed
    within `timeout_s`."""
    wanted = bundles(specs)
    if not wanted:
        return Reservation(None, [])
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    start = time.monotonic()
    group = placement_group([b.resources for b in wanted], strategy=strategy)
    if not group.wait(timeout_s):
        remove_placement_group(group)
        raise PlacementError(unplaced_message(wanted, strategy, timeout_s, cluster_nodes()))
    where = placement_group_table(group)["bundles_to_node_id"]
    on: dict[str, list[str]] = {}
    for i, b in enumerate(wanted):
        on.setdefault(where[i], []).append(b.label())
    print(f"[saferl] placement group of {len(wanted)} bundles ({strategy}) placed in "
          f"{time.monotonic() - start:.1f}s: " + "; ".join(f"node {n[:8]}: {' '.join(labels)}"
                                                            for n, labels in on.items()), flush=True)
    return Reservation(group, wanted)


def unplaced_message(wanted: list[Bundle], strategy: str, timeout_s: float, nodes: list[Node]) -> str:
    """Why a placement group was not placed: the bundles that fit nowhere, the cluster, what to change."""
    head = (f"Ray could not place the run's {len(wanted)} bundles within {timeout_s:g}s "
            f"(ray.placement_timeout_s; strategy {strategy}, ray.placement_strategy).")
    _, left = first_fit(wanted, {n.node_id: n.free for n in nodes})
    if strategy == "STRICT_SPREAD" and len(wanted) > len(nodes):
        why = f" STRICT_SPREAD puts each bundle on its own node: {len(wanted)} bundles, {len(nodes)} nodes."
    elif strategy == "STRICT_PACK":
        need = {k: sum(b.resources.get(k, 0.0) for b in wanted) for k in ("CPU", "GPU")}
        why = (f" STRICT_PACK puts every bundle on one node: CPU {need['CPU']:g}, GPU {need['GPU']:g} on one "
               "node.")
    elif left:
        roles = list(dict.fromkeys(b.role for b in left))
        why = (" No node has room for " + ", ".join(f"{b.label()} ({b.describe()})" for b in left)
               + " beside the others (first-fit, largest first, on the nodes' free resources). Change "
               + "; ".join(f"{RESOURCE_KEYS.get(r, r)}" for r in roles) + ", the number of actors, or add nodes.")
    else:
        why = (" A first-fit packing of the nodes' free resources places them all now: resources were taken "
               "while waiting, or Ray's packing differed; run again or raise ray.placement_timeout_s.")
    wanted_text = ", ".join(f"{b.label()} {b.describe()}" for b in wanted)
    return (f"{head}{why}\nBundles: {wanted_text}.\nThe cluster ({len(nodes)} nodes): "
            + "; ".join(n.describe() for n in nodes) + ".")

