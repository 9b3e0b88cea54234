"""The placement plan: the role specs a run starts (class, actors, resources, arguments), printed with a per-GPU
memory estimate.

`saferl.roles.role_specs` turns the config into `RoleSpec`s; `saferl train --dry-run` prints them
(`format_plan`) without loading weights, and the driver prints the same list, checks its `requests` against
the Ray cluster and hands it to `build_roles`, which starts exactly those actors. So the plan printed is what
runs, and a config asking for more GPUs or CPUs than exist fails at once instead of waiting for placement.
On Ray the actors are placed into one placement group of `bundles` (one per actor, reserved before any actor
starts: `saferl.cluster`); `first_fit` explains a group that could not be placed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saferl.config import SafeRLConfig


@dataclass(frozen=True)
class RoleSpec:
    """One role's actors: `actors` instances of `cls(**kwargs)` (plus the rank keyword), each holding `cpus` and
    `gpus` on Ray (`executor: ray`) or living in the driver process (`local`: in-process runs, remote clients)."""

    role: str  # rollout | guard | helpfulness | trainer | judge
    cls: type
    actors: int
    executor: str
    cpus: float  # per actor
    gpus: float  # per actor; a tensor-parallel engine holds all its GPUs
    kwargs: dict[str, Any]
    model: str  # what the plan names: the model reference, or the endpoints of a remote role
    model_dir: str | None  # the resolved local model directory (None: served elsewhere)
    engine: str  # vllm | hf | http | openai | torch | ds-z<stage>
    dtype: str
    tensor_parallel: int = 1
    rank_kwarg: str | None = None  # constructor keyword that receives each actor's rank
    max_restarts: int = 0
    # Further local model directories the actors host (an RM ensemble's members): checked before any actor
    # starts, as `model_dir` is, and counted in the memory estimate.
    member_dirs: tuple[str, ...] = ()


def requests(specs: list[RoleSpec]) -> dict[str, tuple[int, float, float]]:
    """role -> (actors, CPUs per actor, GPUs per actor); remote clients hold nothing."""
    return {s.role: (s.actors, s.cpus, s.gpus) for s in specs}


@dataclass(frozen=True)
class Bundle:
    """One actor's reservation in the run's placement group: `role`'s actor `rank` holds `resources`."""

    role: str
    rank: int
    resources: dict[str, float]  # "CPU" and/or "GPU"; never empty (Ray refuses an empty bundle)

    def label(self) -> str:
        return f"{self.role}[{self.rank}]"

    def describe(self) -> str:
        return " ".join(f"{k} {v:g}" for k, v in self.resources.items())


def bundles(specs: list[RoleSpec]) -> list[Bundle]:
    """The placement group's bundles, in spec then rank order: one per Ray actor, holding exactly what the
    actor asks for, so an actor that Ray restarts fits back into its own bundle. Actors in the driver process
    (`executor: local`, remote clients) and actors that ask for no CPU and no GPU have none."""
    out = []
    for s in specs:
        resources = {k: v for k, v in (("CPU", s.cpus), ("GPU", s.gpus)) if v > 0}
        if s.executor == "ray" and resources:
            out.extend(Bundle(s.role, rank, resources) for rank in range(s.actors))
    return out


EPS = 1e-9  # Ray counts resources in units of 1e-4; shares such as 0.125 add up exactly in binary anyway


def first_fit(wanted: list[Bundle], free: dict[str, dict[str, float]]) -> tuple[dict[str, str], list[Bundle]]:
    """Place bundles on nodes first-fit decreasing (GPUs first, then CPUs, the largest first, onto the first
    node in `free`'s order with room), as a best guess of what a cluster can hold. Returns (bundle label ->
    node, the bundles that fit nowhere). `free`: node -> its free resources; not modified. Greedy, so it may
    miss a packing that exists; the driver uses it only to explain a placement group Ray could not place."""
    room = {node: dict(resources) for node, resources in free.items()}
    placed, left = {}, []
    for b in sorted(wanted, key=lambda b: (-b.resources.get("GPU", 0.0), -b.resources.get("CPU", 0.0))):
        node = next((n for n, r in room.items() if all(r.get(k, 0.0) + EPS >= v for k, v in b.resources.items())),
                    None)
        if node is None:
            left.append(b)
            continue
        for k, v in b.resources.items():
            room[node][k] = room[node].get(k, 0.0) - v
        placed[b.label()] = node
    return placed, left


def format_bundles(wanted: list[Bundle], strategy: str) -> str:
    """The placement group as `--dry-run` and the driver print it: one line per bundle."""
    lines = [f"placement group: {len(wanted)} bundles, strategy {strategy} (ray.placement_strategy)"]
    lines += [f"  bundle {i:2d}  {b.label():16s} {b.describe()}" for i, b in enumerate(wanted)]
    return "\n".join(lines)


def needs_reference_logprobs(cfg: SafeRLConfig) -> bool:
    """The driver asks the trainer for reference log-probs each step (`ScoredRollout.reference_logprob`): for
    the fluency gate (reward.rules.fluency_min_logprob) or the monitor's fluency statistic (monitor.sample)."""
    return cfg.reward.rules.fluency_min_logprob is not None or cfg.monitor.sample > 0


def count_params(config_path: Path) -> int | None:
    """Parameter count of a Qwen-style decoder from its config.json (None when it is not a decoder config)."""
    c = json.loads(config_path.read_text())
    c = c.get("text_config", c)
    try:
        h, n, v, ff = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
        heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    except KeyError:
        return None
    hd = c.get("head_dim") or h // heads
    per_layer = h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * ff + 2 * h
    embed = v * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return n * per_layer + embed + h


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def memory_gib(spec: RoleSpec, cfg: SafeRLConfig) -> str:
    """Weights (+ grads and AdamW states for the trainer) per GPU, when the model's config is local."""
    if spec.model_dir is None:
        return "served elsewhere"
    configs = [Path(d) / "config.json" for d in (spec.model_dir, *spec.member_dirs)]
    if not all(config.is_file() for config in configs):
        return "n/a (config not local)"
    counts = [count_params(config) for config in configs]
    if None in counts:
        return "n/a"
    params = sum(counts)  # type: ignore[arg-type]
    total = params * (trainer_bytes_per_param(cfg) if spec.role == "trainer" else BYTES.get(spec.dtype, 4))
    total /= max(1, spec.tensor_parallel)
    return f"{total / 2**30:.2f} GiB ({params / 1e6:.1f}M params{', +KV cache' if spec.engine == 'vllm' else ''})"


def trainer_bytes_per_param(cfg: SafeRLConfig) -> float:
    """Trainer memory per parameter on one worker: weights, gradients, AdamW state, master copy, reference.

    torch: fp32 weights (autocast computes in bf16) + fp32 grads + Adam m, v. DeepSpeed: weights and grads in
    the compute dtype plus fp32 master and Adam state, sharded over workers by ZeRO stage (1: optimizer state,
    2: + gradients, 3: + weights). LoRA trains a negligible number of parameters.
    """
    t = cfg.trainer
    w, b = max(1, t.workers), BYTES.get(t.dtype, 4)
    reference = b if (t.kl_coef > 0 or needs_reference_logprobs(cfg)) and not t.lora.rank else 0
    if t.lora.rank:
        return (4 if t.strategy == "torch" else b) + reference
    if t.strategy == "torch":
        return 4 + 4 + 8 + reference
    master = 0 if b == 4 else 4
    stage = t.zero_stage
    optim = (master + 8) / (w if stage >= 1 else 1)
    grads = b / (w if stage >= 2 else 1)
    weights = b / (w if stage >= 3 else 1)
    return weights + grads + optim + reference


def format_plan(specs: list[RoleSpec], cfg: SafeRLConfig) -> str:
    """The table `--dry-run` and the driver print: one row per spec (GPU/actor counts every tensor-parallel
    GPU), and the totals that Ray must provide."""
    lines = [f"executor: {cfg.run.executor}   ray: {cfg.ray.address or 'local (127.0.0.1)'}",
             f"{'role':12s} {'actors':>6s} {'CPU/actor':>9s} {'GPU/actor':>9s} {'engine':>6s} {'TP':>3s}  "
             f"{'memory per GPU (estimate)':28s} model"]
    for s in specs:
        lines.append(f"{s.role:12s} {s.actors:6d} {s.cpus:9g} {s.gpus:9g} {s.engine:>6s} {s.tensor_parallel:3d}  "
                     f"{memory_gib(s, cfg):28s} {s.model}")
    placed = requests(specs).values()
    lines.append(f"total: {sum(n * c for n, c, _ in placed):g} CPUs, {sum(n * g for n, _, g in placed):g} GPUs")
    if cfg.run.executor == "ray":
        lines.append(format_bundles(bundles(specs), cfg.ray.placement_strategy))
    return "\n".join(lines)
