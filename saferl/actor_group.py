"""ActorGroup: N instances of one role, as Ray actors or as local objects; shard, call, gather.

The only place SafeRL calls `ray.remote`. With `executor="local"` the same classes are instantiated in this
process, so one code path serves a multi-GPU cluster, a pdb session and a single-GPU machine.
Ray is started here too (`start_ray`): on loopback only unless an address is given, with an explicit CPU
count and a project-local temp dir, and with the per-process settings of `saferl.runtime` for every actor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from saferl.runtime import actor_env, has_gpu

READY_TIMEOUT_S = 600.0
T = TypeVar("T")


def start_ray(address: str | None, num_cpus: int | None, temp_dir: str,
              torch_threads: int = 0) -> dict[str, float]:
    """Start (or join) Ray; returns the cluster's resources. Idempotent within a process.

    A cluster `address` is probed first (`check_ray_address`), so one that nothing answers fails in seconds
    instead of Ray's minutes of reconnecting. Its nodes are taken to have GPUs; a local Ray has them when this
    machine does. `torch_threads` is `run.torch_threads`, applied to every actor (`saferl.runtime.actor_env`).
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback listeners; before import
    import ray

    if not ray.is_initialized():
        if address:
            check_ray_address(address)
            ray.init(address=address, runtime_env={"env_vars": actor_env(torch_threads, True, os.environ)},
                     log_to_driver=True)
        else:
            Path(temp_dir).mkdir(parents=True, exist_ok=True)
            env = actor_env(torch_threads, has_gpu(), os.environ)
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     _temp_dir=str(Path(temp_dir).resolve()), _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": env}, log_to_driver=True)
    return dict(ray.cluster_resources())


RAY_PROBE_TIMEOUT_S = 10.0
RAY_CLIENT_PORT = 10001  # the default port of `ray://` addresses (Ray Client server)


def ray_endpoint(address: str) -> tuple[str, int]:
    """The host and port that `ray.init(address)` connects to first.

    `ray://host[:port]` is a Ray Client address (port 10001 by default); `auto` is the cluster this node runs
    (RAY_ADDRESS, else the one `ray start` recorded); `host:port` is a GCS address, with localhost names turned
    into this node's IP as Ray does. Raises ConnectionError naming the address when `auto` finds no cluster,
    ValueError when the address has no port.
    """
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address.startswith("ray://"):
        host, sep, port = address[len("ray://"):].rstrip("/").rpartition(":")
        if not sep:
            host, port = port, str(RAY_CLIENT_PORT)
    else:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            resolved = canonicalize_bootstrap_address(address)
        except ConnectionError as e:
            raise ConnectionError(f"ray.address={address}: no Ray cluster runs on this node ({e}); start one "
                                  "with `ray start --head`, or set ray.address to its ip:port") from None
        except ValueError as e:
            raise ValueError(f"ray.address={address}: not an address Ray understands ({e}); use auto, "
                             "ip:port or ray://ip:port") from None
        if resolved is None:  # "local": ray.init starts a new cluster
            raise ValueError(f"ray.address={address}: leave ray.address null to start a local Ray")
        host, _, port = resolved.rpartition(":")
    if not port.isdigit() or not host:
        raise ValueError(f"ray.address={address}: expected host:port, e.g. 10.0.0.5:6379 or "
                         "ray://10.0.0.5:10001")
    return host.strip("[]"), int(port)


def check_ray_address(address: str, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Raise ConnectionError naming `address` unless something accepts a TCP connection at its host and port
    within `timeout_s` (ray.init itself retries an absent cluster for minutes)."""
    import socket

    host, port = ray_endpoint(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        where = "" if address.endswith(f"{host}:{port}") else f" (connecting to {host}:{port})"
        raise ConnectionError(f"ray.address={address}: no Ray cluster answers{where}: {e}. Start it "
                              "(`ray start --head`) or fix ray.address") from None


class PlacementError(RuntimeError):
    """The cluster cannot hold what the config asks for; the message names the roles and the resources."""


def check_resources(requests: dict[str, tuple[int, float, float]], available: dict[str, float]) -> None:
    """Fail fast, instead of waiting forever for placement, when roles ask for more than the cluster has.

    Args:
        requests: role -> (actors, cpus per actor, gpus per actor).
        available: Ray cluster resources.
    """
    for resource, pos in (("CPU", 1), ("GPU", 2)):
        need = sum(r[0] * r[pos] for r in requests.values())
        have = available.get(resource, 0.0)
        if need > have + 1e-9:
            detail = ", ".join(f"{role}: {r[0]} x {r[pos]:g}" for role, r in requests.items() if r[pos])
            raise PlacementError(f"The config asks for {need:g} {resource}s but the Ray cluster has {have:g} "
                               f"({detail}). Lower the per-actor resources or the number of actors.")


class ActorGroup:
    """`n` instances of `cls(**kwargs)`, hosted by Ray (`executor="ray"`) or in-process (`"local"`)."""

    def __init__(self, cls: type, n: int, *, executor: str, kwargs: dict[str, Any], num_cpus: float = 1.0,
                 num_gpus: float = 0.0, name: str = "", rank_kwarg: str | None = None, max_restarts: int = 0,
                 scheduling: list[Any] | None = None) -> None:
        """`rank_kwarg` names a constructor keyword that receives each actor's index (its data-parallel rank).
        `scheduling`: one Ray scheduling strategy per actor (its placement-group bundle, `saferl.cluster`);
        None: Ray places each actor wherever it fits.

        `max_restarts` > 0 (stateless roles only, e.g. scorers): Ray restarts a dead actor and re-runs the
        calls it had in flight, so a crash costs time, not samples.
        """
        if n < 1:
            raise ValueError(f"{name or cls.__name__}: need at least one actor, got {n}")
        self.name = name or cls.__name__
        self.executor = executor
        per_actor = [{**kwargs, **({rank_kwarg: i} if rank_kwarg else {})} for i in range(n)]
        if executor == "local":
            self.actors = [cls(**kw) for kw in per_actor]
            return
        import ray

        remote_cls = ray.remote(cls)
        # Unnamed actors: two experiments may share one cluster.
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=max_restarts)
        where = [dict(scheduling_strategy=s) for s in scheduling] if scheduling else [{}] * n
        self.actors = [remote_cls.options(**options, **at).remote(**kw) for kw, at in zip(per_actor, where)]
        refs = [a.ready.remote() for a in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT_S)
        ray.get(ready)  # re-raises a constructor error (missing model directory, ...) with its message
        if pending:
            raise TimeoutError(f"{self.name}: {len(pending)} actors not ready after {READY_TIMEOUT_S:.0f}s")
        self._pids = self._actor_pids()
        self._restarts = 0

    def node_ids(self) -> list[str]:
        """The Ray node each actor runs on now (hex ids); empty in-process."""
        if self.executor == "local":
            return []
        import ray

        return ray.get([a.__ray_call__.remote(_node_id) for a in self.actors])

    def _actor_pids(self) -> list[int]:
        import ray

        return ray.get([a.__ray_call__.remote(_pid) for a in self.actors])

    def restarts(self) -> int:
        """How many times Ray has restarted this group's actors so far: an actor whose process id changed since
        the last look counts once (two restarts between looks count as one). Always 0 in-process."""
        if self.executor == "local":
            return 0
        pids = self._actor_pids()
        self._restarts += sum(old != new for old, new in zip(self._pids, pids))
        self._pids = pids
        return self._restarts

    def __len__(self) -> int:
        return len(self.actors)

    def _invoke(self, actor: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.executor == "local":
            return getattr(actor, method)(*args, **kwargs)
        return getattr(actor, method).remote(*args, **kwargs)

    def _gather(self, results: list[Any]) -> list[Any]:
        if self.executor == "local":
            return results
        import ray

        return ray.get(results)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every actor with the same arguments; one result per actor. An argument may be a
        result of `call_later` (on Ray an object reference: each actor reads it from the object store)."""
        return self._gather(self.call_later(method, *args, **kwargs))

    def call_later(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`call` without waiting: on Ray one object reference per actor, which can be passed on to another
        group's `call` without the result passing through this process; locally the results themselves."""
        if self.executor == "ray" and args and len(self.actors) > 1:
            import ray

            # One copy in the object store, not one per actor; a reference already is one.
            args = tuple(a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args)
        return [self._invoke(a, method, *args, **kwargs) for a in self.actors]

    def wait(self, results: list[Any]) -> list[Any]:
        """The values of `call_later`'s results (re-raising an actor's error)."""
        return self._gather(results)

    def map(self, method: str, items: list[Any], *args: Any, offset_kwarg: str | None = None,
            **kwargs: Any) -> list[Any]:
        """Split `items` into contiguous shards, one per actor, call in parallel, concatenate the results.

        `offset_kwarg` names a keyword that receives each shard's start index (e.g. for per-item seeds).
        """
        return self.submit(method, items, *args, offset_kwarg=offset_kwarg, **kwargs).result()

    def submit(self, method: str, items: list[Any], *args: Any, offset_kwarg: str | None = None,
               **kwargs: Any) -> Pending[Any]:
        """`map` without waiting: on Ray the shards run while the caller goes on; locally they run now."""
        return Pending(self.executor, [self._invoke(actor, method, shard, *args, **kwargs, **extra)
                                       for actor, shard, extra in self._shards(items, offset_kwarg)])

    def stream(self, method: str, items: list[Any], *args: Any, offset_kwarg: str | None = None,
               **kwargs: Any) -> Iterator[Any]:
        """Shard `items` over the actors like `map`, for a generator method: yields every value any actor
        yields, in the order they are produced (Ray streaming generators), so the caller can act on early
        values while the actors keep working. Locally each actor's generator runs to the end in turn."""
        calls = [(actor, shard, extra) for actor, shard, extra in self._shards(items, offset_kwarg)]
        if self.executor == "local":
            for actor, shard, extra in calls:
                yield from list(getattr(actor, method)(shard, *args, **kwargs, **extra))
            return
        import ray

        streams = [getattr(actor, method).options(num_returns="streaming").remote(shard, *args, **kwargs, **extra)
                   for actor, shard, extra in calls]
        while streams:
            ready, _ = ray.wait(streams, num_returns=1)
            try:
                ref = next(ready[0])
            except StopIteration:
                streams.remove(ready[0])
                continue
            yield ray.get(ref)

    def _shards(self, items: list[Any], offset_kwarg: str | None) -> list[tuple[Any, list[Any], dict[str, int]]]:
        """Contiguous shards of `items`, one per actor (fewer when there are fewer items than actors)."""
        if not items:
            return []
        n = min(len(self.actors), len(items))
        bounds = [len(items) * i // n for i in range(n + 1)]
        return [(actor, items[lo:hi], {offset_kwarg: lo} if offset_kwarg else {})
                for actor, lo, hi in zip(self.actors, bounds, bounds[1:])]

    def shutdown(self) -> None:
        if self.executor == "ray":
            import ray

            for a in self.actors:
                ray.kill(a)
        self.actors = []


def _pid(actor: Any) -> int:
    return os.getpid()


def _node_id(actor: Any) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class Pending(Generic[T]):
    """Results of a `submit`: one list per shard, concatenated by `result()` (a `list[T]`)."""

    def __init__(self, executor: str, shards: list[Any]) -> None:
        self.executor = executor
        self.shards = shards

    def done(self) -> bool:
        if self.executor == "local" or not self.shards:
            return True
        import ray

        ready, _ = ray.wait(self.shards, num_returns=len(self.shards), timeout=0)
        return len(ready) == len(self.shards)

    def result(self) -> list[T]:
        shards = self.shards
        if self.executor == "ray":
            import ray

            shards = ray.get(shards)
        return [x for shard in shards for x in shard]
