"""Every role of a run, built from config: rollout engines, guard, helpfulness model, policy trainer ranks.

`build_roles` turns the config into `ActorGroup`s (Ray actors or local objects) with plain arguments, so the
role classes never see the config. Scorers on Ray restart after a crash; remote guards and reward models
(`backend: http | openai`) are clients in the driver process. Model paths are resolved and checked before
any actor starts.
"""

from __future__ import annotations

import dataclasses

from saferl.actor_group import ActorGroup
from saferl.config import SafeRLConfig
from saferl.guard.remote import RemoteGuardScorer
from saferl.guard.scorer import GuardScorer
from saferl.helpfulness import HelpfulnessScorer
from saferl.references import resolve_reference
from saferl.rollout.worker import RolloutWorker
from saferl.runtime import check_model_dir
from saferl.serving.client import EndpointPool, RemoteHelpfulnessScorer
from saferl.trainer.policy import PolicyTrainer, connect_ranks


def check_endpoints(cfg: SafeRLConfig, timeout_s: float = 10.0) -> None:
    """Health-check the remote guard and reward-model endpoints before anything else starts: ConnectionError
    naming the URLs when none of a pool answers (a wrong URL would train a whole run on fallback verdicts), a
    warning naming the dead ones otherwise. `saferl serve` and vLLM's OpenAI server both answer GET /health;
    other OpenAI-compatible servers may only have /v1/models."""
    g, h = cfg.guard, cfg.helpfulness
    pools = []
    if g.backend in ("http", "openai"):
        pools.append((g.urls, g.token_env, ("/health",) if g.backend == "http" else ("/health", "/v1/models"),
                      "guard", g.timeout_s))
    if h.model is not None and h.backend == "http":
        pools.append((h.urls, h.token_env, ("/health",), "helpfulness", h.timeout_s))
    for urls, token_env, paths, what, request_timeout_s in pools:
        pool = EndpointPool(list(urls), token_env=token_env, timeout_s=request_timeout_s, retries=0,
                            backoff_s=0.0, concurrency=max(1, len(urls)), what=what)
        for url, why in pool.check_health(paths, min(timeout_s, request_timeout_s)).items():
            print(f"[saferl] warning: {what} endpoint {url} is down ({why}); training on the others", flush=True)


@dataclasses.dataclass
class Roles:
    rollout: ActorGroup
    guard: ActorGroup
    helpfulness: ActorGroup | None
    trainer: ActorGroup

    def groups(self) -> list[ActorGroup]:
        return [g for g in (self.rollout, self.guard, self.helpfulness, self.trainer) if g is not None]

    def pop_compute(self) -> dict[str, list[tuple[float, float]]]:
        """Each role's model-compute (start, end) wall-clock intervals since the last call, all its actors
        together (`tracking.step_timing` unites them, so parallel actors and overlapping roles count once)."""
        return {group.name: [iv for actor in group.call("pop_compute") for iv in actor] for group in self.groups()}

    def shutdown(self) -> None:
        for group in self.groups():
            group.shutdown()


def build_roles(cfg: SafeRLConfig) -> Roles:
    """Create every role's actors (or local objects) from config; all model paths are resolved first."""
    ex, r, g, h, t = cfg.run.executor, cfg.rollout, cfg.guard, cfg.helpfulness, cfg.trainer
    policy = resolve_reference(cfg.policy.model, cfg.toyworld)
    remote_guard = g.backend in ("http", "openai")
    guard_model = None if remote_guard else resolve_reference(g.model, cfg.toyworld)
    rm_model = (resolve_reference(h.model, cfg.toyworld) if h.model is not None and h.backend != "http"
                else None)
    for path in (policy, guard_model, rm_model):  # before any actor starts
        if path is not None:
            check_model_dir(path)
    rollout = ActorGroup(RolloutWorker, r.num_engines, executor=ex, name="rollout", num_cpus=r.cpus_per_engine,
                         num_gpus=r.gpus_per_engine * r.tensor_parallel_size, kwargs=dict(
                             model=policy, backend=r.backend, dtype=cfg.policy.dtype, max_model_len=r.max_model_len,
                             tensor_parallel_size=r.tensor_parallel_size, kv_cache_mib=r.kv_cache_mib,
                             gpu_memory_utilization=r.gpu_memory_utilization, enable_thinking=r.enable_thinking,
                             seed=cfg.run.seed))
    if remote_guard:  # a client in this process; the model is served elsewhere
        guard = ActorGroup(RemoteGuardScorer, 1, executor="local", name="guard", kwargs=dict(
            urls=list(g.urls), protocol="saferl" if g.backend == "http" else "openai",
            served_model_name=g.served_model_name, token_env=g.token_env, timeout_s=g.timeout_s,
            retries=g.retries, fallback=g.fallback, max_new_tokens=g.max_new_tokens))
    else:
        guard = ActorGroup(GuardScorer, g.num_actors, executor=ex, name="guard", num_cpus=g.cpus_per_actor,
                           num_gpus=g.gpus_per_actor, max_restarts=g.max_restarts, kwargs=dict(
                               model=guard_model, backend=g.backend, max_new_tokens=g.max_new_tokens,
                               max_model_len=g.max_model_len, dtype=g.dtype, kv_cache_mib=g.kv_cache_mib,
                               gpu_memory_utilization=g.gpu_memory_utilization))
    helpfulness = None
    if h.model is not None and h.backend == "http":
        helpfulness = ActorGroup(RemoteHelpfulnessScorer, 1, executor="local", name="helpfulness", kwargs=dict(
            urls=list(h.urls), token_env=h.token_env, timeout_s=h.timeout_s, retries=h.retries,
            fallback_score=h.fallback_score, batch_size=h.batch_size))
    elif rm_model is not None:
        helpfulness = ActorGroup(HelpfulnessScorer, h.num_actors, executor=ex, name="helpfulness",
                                 num_cpus=h.cpus_per_actor, num_gpus=h.gpus_per_actor, max_restarts=h.max_restarts,
                                 kwargs=dict(model=rm_model, backend=h.backend, dtype=h.dtype,
                                             batch_size=h.batch_size, max_length=h.max_length,
                                             gpu_memory_utilization=h.gpu_memory_utilization,
                                             kv_cache_mib=h.kv_cache_mib))
    trainer = ActorGroup(PolicyTrainer, t.workers, executor=ex, name="trainer", num_cpus=t.cpus, num_gpus=t.gpus,
                         rank_kwarg="rank", kwargs=dict(
                             model=policy, world_size=t.workers, strategy=t.strategy, zero_stage=t.zero_stage,
                             lr=t.lr, lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=t.steps,
                             weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, minibatches=t.minibatches,
                             micro_batch_size=t.micro_batch_size, loss=t.loss, clip_low=t.clip_low,
                             clip_high=t.clip_high, aggregation=t.aggregation, temperature=r.temperature, top_p=r.top_p,
                             dtype=t.dtype, kl_coef=t.kl_coef, entropy_coef=t.entropy_coef, lora_rank=t.lora.rank,
                             lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                             lora_target_modules=tuple(t.lora.target_modules), seed=cfg.run.seed))
    connect_ranks(trainer)
    return Roles(rollout, guard, helpfulness, trainer)
