"""Every role of a run, built from config: rollout engines, guard, helpfulness model, policy trainer ranks and
the independent judge (`eval.judge`, a second guard).

`role_specs` turns the config into one `RoleSpec` per role (class, actors, resources, plain constructor
arguments, so the role classes never see the config); the dry-run plan prints that list and `build_roles`
starts exactly it, as `ActorGroup`s (Ray actors or local objects) behind typed handles (`saferl.handles`).
Scorers on Ray restart after a crash; remote guards and reward models (`backend: http | openai`) are clients
in the driver process. Model paths are resolved and checked before any actor starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from saferl.actor_group import ActorGroup
from saferl.cluster import Reservation
from saferl.config import GuardConfig, SafeRLConfig
from saferl.guard.remote import RemoteGuardScorer
from saferl.guard.scorer import GuardScorer
from saferl.handles import (GuardGroup, HelpfulnessGroup, RolloutGroup, TrainerGroup, failure_counters,
                            pop_compute)
from saferl.helpfulness import HelpfulnessScorer
from saferl.placement import RoleSpec, needs_reference_logprobs
from saferl.references import resolve_reference
from saferl.rollout.worker import RolloutWorker
from saferl.runtime import check_model_dir
from saferl.serving.client import EndpointPool, RemoteHelpfulnessScorer
from saferl.tracking import Interval
from saferl.trainer.policy import PolicyTrainer


def check_endpoints(cfg: SafeRLConfig, timeout_s: float = 10.0) -> None:
    """Health-check the remote guard and reward-model endpoints before anything else starts: ConnectionError
    naming the URLs when none of a pool answers (a wrong URL would train a whole run on fallback verdicts), a
    warning naming the dead ones otherwise. `saferl serve` and vLLM's OpenAI server both answer GET /health;
    other OpenAI-compatible servers may only have /v1/models."""
    h = cfg.helpfulness
    pools = []
    for what, g in (("guard", cfg.guard), ("eval.judge", cfg.eval.judge)):  # what: the config section
        if g is not None and g.backend in ("http", "openai"):
            paths = ("/health",) if g.backend == "http" else ("/health", "/v1/models")
            pools.append((g.urls, g.token_env, paths, what, g.timeout_s))
    if h.model is not None and h.backend == "http":
        pools.append((h.urls, h.token_env, ("/health",), "helpfulness", h.timeout_s))
    for urls, token_env, paths, what, request_timeout_s in pools:
        pool = EndpointPool(list(urls), token_env=token_env, timeout_s=request_timeout_s, retries=0,
                            backoff_s=0.0, concurrency=max(1, len(urls)), what=what)
        for url, why in pool.check_health(paths, min(timeout_s, request_timeout_s)).items():
            print(f"[saferl] warning: {what} endpoint {url} is down ({why}); training on the others", flush=True)


@dataclasses.dataclass
class Roles:
    """The typed handles of a run's roles (`saferl.handles`); `helpfulness` is None without a reward model,
    `judge` (the independent guard of `eval.judge`) None without one."""

    rollout: RolloutGroup
    guard: GuardGroup
    helpfulness: HelpfulnessGroup | None
    trainer: TrainerGroup
    judge: GuardGroup | None = None

    def groups(self) -> dict[str, ActorGroup]:
        return {h.group.name: h.group for h in (self.rollout, self.guard, self.helpfulness, self.trainer,
                                                self.judge) if h is not None}

    def pop_compute(self) -> dict[str, list[Interval]]:
        """Each role's model-compute (start, end) wall-clock intervals since the last call, all its actors
        together (`tracking.step_timing` unites them, so parallel actors and overlapping roles count once)."""
        return {name: pop_compute(group) for name, group in self.groups().items()}

    def failure_counters(self) -> dict[str, float]:
        """The scorers' cumulative failure counters and Ray restarts, as `guard/<k>`, `rm/<k>` and `judge/<k>`
        metrics."""
        scorers = (("guard", self.guard), ("rm", self.helpfulness), ("judge", self.judge))
        return {f"{prefix}/{k}": v for prefix, h in scorers if h is not None
                for k, v in failure_counters(h.group).items()}

    def shutdown(self) -> None:
        for group in self.groups().values():
            group.shutdown()


def role_specs(cfg: SafeRLConfig, *, build: bool = True) -> list[RoleSpec]:
    """What a run starts, from config: one spec per role, with every model reference resolved (`build=False`,
    for the dry-run plan: toy-world parts are named where they would be, nothing is built)."""
    ex, r, g, h, t = cfg.run.executor, cfg.rollout, cfg.guard, cfg.helpfulness, cfg.trainer

    def local(ref: str) -> str:
        return resolve_reference(ref, cfg.toyworld, build=build)

    policy = local(cfg.policy.model)
    specs = [RoleSpec("rollout", RolloutWorker, r.num_engines, ex, r.cpus_per_engine,
                      r.gpus_per_engine * r.tensor_parallel_size, dict(
                          model=policy, backend=r.backend, dtype=cfg.policy.dtype, max_model_len=r.max_model_len,
                          tensor_parallel_size=r.tensor_parallel_size, kv_cache_mib=r.kv_cache_mib,
                          gpu_memory_utilization=r.gpu_memory_utilization, enable_thinking=r.enable_thinking,
                          seed=cfg.run.seed),
                      cfg.policy.model, policy, r.backend, cfg.policy.dtype, r.tensor_parallel_size)]
    specs.append(guard_spec("guard", "guard", g, ex, local))
    if h.model is not None and h.backend == "http":
        specs.append(RoleSpec("helpfulness", RemoteHelpfulnessScorer, 1, "local", 0.0, 0.0, dict(
            urls=list(h.urls), token_env=h.token_env, timeout_s=h.timeout_s, retries=h.retries,
            fallback_score=h.fallback_score, batch_size=h.batch_size),
            ", ".join(h.urls) or "(helpfulness.urls is empty)", None, "http", h.dtype))
    elif h.model is not None:
        rm_model, members = local(h.model), tuple(local(m) for m in h.ensemble)
        specs.append(RoleSpec("helpfulness", HelpfulnessScorer, h.num_actors, ex, h.cpus_per_actor,
                              h.gpus_per_actor, dict(model=rm_model, members=members, backend=h.backend,
                                                     dtype=h.dtype, batch_size=h.batch_size,
                                                     max_length=h.max_length,
                                                     gpu_memory_utilization=h.gpu_memory_utilization,
                                                     kv_cache_mib=h.kv_cache_mib),
                              " + ".join([h.model, *h.ensemble]), rm_model, h.backend, h.dtype,
                              max_restarts=h.max_restarts, member_dirs=members))
    specs.append(RoleSpec("trainer", PolicyTrainer, t.workers, ex, t.cpus, t.gpus, dict(
        model=policy, world_size=t.workers, strategy=t.strategy, zero_stage=t.zero_stage, lr=t.lr,
        lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=t.steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, minibatches=t.minibatches, micro_batch_size=t.micro_batch_size,
        loss=t.loss, clip_low=t.clip_low, clip_high=t.clip_high, aggregation=t.aggregation,
        temperature=r.temperature, top_p=r.top_p, dtype=t.dtype, kl_coef=t.kl_coef, entropy_coef=t.entropy_coef,
        lora_rank=t.lora.rank, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
        lora_target_modules=tuple(t.lora.target_modules), seed=cfg.run.seed,
        reference_scoring=needs_reference_logprobs(cfg), unlikelihood_coef=t.unlikelihood_coef,
        implausible_mass_coef=t.implausible_mass_coef,
        implausible_logprob=cfg.reward.rules.fluency_min_logprob),
        cfg.policy.model, policy, f"ds-z{t.zero_stage}" if t.strategy == "deepspeed" else "torch", t.dtype,
        rank_kwarg="rank"))
    if cfg.eval.judge is not None:
        specs.append(guard_spec("judge", "eval.judge", cfg.eval.judge, ex, local))
    return specs


def guard_spec(role: str, section: str, g: GuardConfig, executor: str,
               local: Callable[[str], str]) -> RoleSpec:
    """A guard role from its config section (`guard`, or `eval.judge`): `GuardScorer` actors hosting the
    model, or for `backend: http | openai` one `RemoteGuardScorer` client in this process. `local` resolves a
    model reference."""
    if g.backend in ("http", "openai"):  # a client in this process; the model is served elsewhere
        return RoleSpec(role, RemoteGuardScorer, 1, "local", 0.0, 0.0, dict(
            urls=list(g.urls), protocol="saferl" if g.backend == "http" else "openai",
            served_model_name=g.served_model_name, token_env=g.token_env, timeout_s=g.timeout_s,
            retries=g.retries, fallback=g.fallback, max_new_tokens=g.max_new_tokens),
            ", ".join(g.urls) or f"({section}.urls is empty)", None, g.backend, g.dtype)
    model = local(g.model)
    return RoleSpec(role, GuardScorer, g.num_actors, executor, g.cpus_per_actor, g.gpus_per_actor, dict(
        model=model, backend=g.backend, max_new_tokens=g.max_new_tokens, max_model_len=g.max_model_len,
        dtype=g.dtype, kv_cache_mib=g.kv_cache_mib, gpu_memory_utilization=g.gpu_memory_utilization),
        g.model, model, g.backend, g.dtype, max_restarts=g.max_restarts)


def start_group(spec: RoleSpec, reservation: Reservation | None = None) -> ActorGroup:
    """The actors of one spec, started (on Ray: placed, into their bundles of `reservation` when given, and
    constructed before this returns)."""
    return ActorGroup(spec.cls, spec.actors, executor=spec.executor, name=spec.role, kwargs=spec.kwargs,
                      num_cpus=spec.cpus, num_gpus=spec.gpus, rank_kwarg=spec.rank_kwarg,
                      max_restarts=spec.max_restarts,
                      scheduling=reservation.scheduling(spec) if reservation is not None else None)


def build_roles(specs: list[RoleSpec], start: Callable[[RoleSpec], ActorGroup] = start_group) -> Roles:
    """Start every spec's actors (or local objects) and wrap them in typed handles; every local model
    directory is checked before any actor starts. `start` is `start_group` except in tests."""
    for spec in specs:
        for model_dir in (spec.model_dir, *spec.member_dirs):
            if model_dir is not None:
                check_model_dir(model_dir)
    groups = {spec.role: start(spec) for spec in specs}
    trainer = TrainerGroup(groups["trainer"])
    trainer.connect()
    rm, judge = groups.get("helpfulness"), groups.get("judge")
    return Roles(RolloutGroup(groups["rollout"]), GuardGroup(groups["guard"]),
                 HelpfulnessGroup(rm) if rm is not None else None, trainer,
                 GuardGroup(judge) if judge is not None else None)
