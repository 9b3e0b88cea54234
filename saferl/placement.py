"""The placement plan: which role runs where, with what resources, and a per-GPU memory estimate.

`saferl train --dry-run` prints it without loading weights; the driver checks it against the Ray cluster
before creating any actor, so a config asking for more GPUs or CPUs than exist fails at once instead of
waiting forever for placement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from saferl.config import SafeRLConfig
from saferl.references import resolve_reference


@dataclass(frozen=True)
class RolePlan:
    role: str
    model: str
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor
    engine: str
    tensor_parallel: int = 1


def plan(cfg: SafeRLConfig) -> list[RolePlan]:
    roles = [
        RolePlan("rollout", cfg.policy.model, cfg.rollout.num_engines, cfg.rollout.cpus_per_engine,
                 cfg.rollout.gpus_per_engine, cfg.rollout.backend, cfg.rollout.tensor_parallel_size),
        RolePlan("guard", cfg.guard.model, cfg.guard.num_actors, cfg.guard.cpus_per_actor,
                 cfg.guard.gpus_per_actor, cfg.guard.backend)
        if cfg.guard.backend in ("vllm", "hf") else
        RolePlan("guard", ", ".join(cfg.guard.urls) or "(guard.urls is empty)", 1, 0.0, 0.0, cfg.guard.backend),
    ]
    h = cfg.helpfulness
    if h.model is not None and h.backend == "http":
        roles.append(RolePlan("helpfulness", ", ".join(h.urls) or "(helpfulness.urls is empty)", 1, 0.0, 0.0, "http"))
    elif h.model is not None:
        roles.append(RolePlan("helpfulness", h.model, h.num_actors, h.cpus_per_actor, h.gpus_per_actor, "hf"))
    t = cfg.trainer
    engine = f"ds-z{t.zero_stage}" if t.strategy == "deepspeed" else "torch"
    roles.append(RolePlan("trainer", cfg.policy.model, t.workers, t.cpus, t.gpus, engine))
    return roles


def requests(roles: list[RolePlan]) -> dict[str, tuple[int, float, float]]:
    """role -> (actors, CPUs per actor, GPUs per actor); a tensor-parallel engine holds `gpus x TP`."""
    return {r.role: (r.actors, r.cpus, r.gpus * r.tensor_parallel) for r in roles}


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


def memory_gib(role: RolePlan, cfg: SafeRLConfig) -> str:
    """Weights (+ grads and AdamW states for the trainer) per GPU, when the model's config is local."""
    if role.engine in ("http", "openai"):
        return "served elsewhere"
    path = resolve_reference(role.model, cfg.toyworld, build=False)  # a dry run builds nothing
    if not (Path(path) / "config.json").is_file():
        return "n/a (config not local)"
    params = count_params(Path(path) / "config.json")
    if params is None:
        return "n/a"
    dtype = {"trainer": cfg.trainer.dtype, "rollout": cfg.policy.dtype, "guard": cfg.guard.dtype,
             "helpfulness": cfg.helpfulness.dtype}[role.role]
    b = BYTES.get(dtype, 4)
    total = params * (trainer_bytes_per_param(cfg) if role.role == "trainer" else b)
    total /= max(1, role.tensor_parallel)
    return f"{total / 2**30:.2f} GiB ({params / 1e6:.1f}M params{', +KV cache' if role.engine == 'vllm' else ''})"


def trainer_bytes_per_param(cfg: SafeRLConfig) -> float:
    """Trainer memory per parameter on one worker: weights, gradients, AdamW state, master copy, reference.

    torch: fp32 weights (autocast computes in bf16) + fp32 grads + Adam m, v. DeepSpeed: weights and grads in
    the compute dtype plus fp32 master and Adam state, sharded over workers by ZeRO stage (1: optimizer state,
    2: + gradients, 3: + weights). LoRA trains a negligible number of parameters.
    """
    t = cfg.trainer
    w, b = max(1, t.workers), BYTES.get(t.dtype, 4)
    reference = b if t.kl_coef > 0 and not t.lora.rank else 0
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


def format_plan(cfg: SafeRLConfig) -> str:
    roles = plan(cfg)
    lines = [f"executor: {cfg.run.executor}   ray: {cfg.ray.address or 'local (127.0.0.1)'}",
             f"{'role':12s} {'actors':>6s} {'CPU/actor':>9s} {'GPU/actor':>9s} {'engine':>6s} {'TP':>3s}  "
             f"{'memory per GPU (estimate)':28s} model"]
    for r in roles:
        lines.append(f"{r.role:12s} {r.actors:6d} {r.cpus:9g} {r.gpus:9g} {r.engine:>6s} {r.tensor_parallel:3d}  "
                     f"{memory_gib(r, cfg):28s} {r.model}")
    cpus = sum(r.actors * r.cpus for r in roles)
    gpus = sum(r.actors * r.gpus * r.tensor_parallel for r in roles)
    lines.append(f"total: {cpus:g} CPUs, {gpus:g} GPUs")
    return "\n".join(lines)
