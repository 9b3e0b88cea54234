"""The SafeRL driver: build the roles from config, then run the step loop in plain sight.

    prompts -> rollouts (vLLM) -> guard verdicts + helpfulness -> reward recipe -> group advantages
            -> GSPO minibatch updates -> weight sync -> metrics -> periodic eval and checkpoint

Roles are plain classes (`RolloutWorker`, `GuardScorer`, `HelpfulnessScorer`, `PolicyTrainer`) placed by
`ActorGroup` as Ray actors (`run.executor: ray`) or in this process (`local`). The held-out evaluation runs
before the first step and after the last with the same seed, and the run ends with a before/after table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from saferl.actor_group import ActorGroup, check_resources, start_ray
from saferl.config import SafeRLConfig, to_yaml
from saferl.data import PromptSampler, load_prompts
from saferl.eval.policy_eval import before_after_table, evaluate, ground_truth_metrics
from saferl.guard.scorer import GuardScorer
from saferl.helpfulness import HelpfulnessScorer
from saferl.placement import format_plan, plan, requests
from saferl.rollout.worker import RolloutWorker
from saferl.runtime import check_model_dir, configure_process
from saferl.scoring import reward_inputs
from saferl.tracking import PhaseTimer, Tracker
from saferl.trainer.advantages import group_advantages
from saferl.trainer.policy import PolicyTrainer
from saferl.trainer.weight_sync import BlobWeightSync
from saferl.types import Rollout, TrainBatch


def resolve(ref: str, cfg: SafeRLConfig) -> str:
    """A model or data reference as a local path: `toyworld:<part>` builds the toy world if needed."""
    if not ref.startswith("toyworld:"):
        return ref
    from saferl.toyworld.build import ensure_built

    return str(ensure_built(cfg.toyworld).part(ref.split(":", 1)[1]))


@dataclasses.dataclass
class Roles:
    rollout: ActorGroup
    guard: ActorGroup
    helpfulness: ActorGroup | None
    trainer: ActorGroup

    def groups(self) -> list[ActorGroup]:
        return [g for g in (self.rollout, self.guard, self.helpfulness, self.trainer) if g is not None]

    def pop_compute_seconds(self) -> float:
        """Model-compute seconds since the last call. Ray actors of a group run a call in parallel (count the
        slowest); local ones run one after another (count them all)."""
        total = 0.0
        for group in self.groups():
            per_actor = group.call("pop_compute")
            combine = max if group.executor == "ray" else sum
            total += sum(combine(call) for call in itertools.zip_longest(*per_actor, fillvalue=0.0))
        return total

    def shutdown(self) -> None:
        for group in self.groups():
            group.shutdown()


def build_roles(cfg: SafeRLConfig) -> Roles:
    """Create every role's actors (or local objects) from config; all model paths are resolved first."""
    ex, r, g, h, t = cfg.run.executor, cfg.rollout, cfg.guard, cfg.helpfulness, cfg.trainer
    policy = resolve(cfg.policy.model, cfg)
    guard_model = resolve(g.model, cfg)
    rm_model = resolve(h.model, cfg) if h.model is not None else None
    for path in (policy, guard_model, rm_model):  # before any actor starts
        if path is not None:
            check_model_dir(path)
    rollout = ActorGroup(RolloutWorker, r.num_engines, executor=ex, name="rollout", num_cpus=r.cpus_per_engine,
                         num_gpus=r.gpus_per_engine * r.tensor_parallel_size, kwargs=dict(
                             model=policy, backend=r.backend, dtype=cfg.policy.dtype, max_model_len=r.max_model_len,
                             tensor_parallel_size=r.tensor_parallel_size, kv_cache_mib=r.kv_cache_mib,
                             gpu_memory_utilization=r.gpu_memory_utilization, enable_thinking=r.enable_thinking,
                             seed=cfg.run.seed))
    guard = ActorGroup(GuardScorer, g.num_actors, executor=ex, name="guard", num_cpus=g.cpus_per_actor,
                       num_gpus=g.gpus_per_actor, kwargs=dict(
                           model=guard_model, backend=g.backend, max_new_tokens=g.max_new_tokens,
                           max_model_len=g.max_model_len, dtype=g.dtype, kv_cache_mib=g.kv_cache_mib,
                           gpu_memory_utilization=g.gpu_memory_utilization))
    helpfulness = None
    if rm_model is not None:
        helpfulness = ActorGroup(HelpfulnessScorer, h.num_actors, executor=ex, name="helpfulness",
                                 num_cpus=h.cpus_per_actor, num_gpus=h.gpus_per_actor,
                                 kwargs=dict(model=rm_model, dtype=h.dtype, batch_size=h.batch_size,
                                             max_length=h.max_length))
    trainer = ActorGroup(PolicyTrainer, 1, executor=ex, name="trainer", num_cpus=t.cpus, num_gpus=t.gpus,
                         kwargs=dict(model=policy, lr=t.lr, weight_decay=t.weight_decay,
                                     max_grad_norm=t.max_grad_norm, minibatches=t.minibatches, loss=t.loss,
                                     clip_low=t.clip_low, clip_high=t.clip_high, aggregation=t.aggregation,
                                     temperature=r.temperature, dtype=t.dtype, kl_coef=t.kl_coef,
                                     seed=cfg.run.seed))
    return Roles(rollout, guard, helpfulness, trainer)


def make_train_batch(rollouts: list[Rollout], advantages: list[float]) -> TrainBatch:
    return TrainBatch(input_ids=[r.prompt_ids + r.response_ids for r in rollouts],
                      prompt_lens=[len(r.prompt_ids) for r in rollouts],
                      old_logprobs=[r.logprobs for r in rollouts], advantages=advantages)


def rollout_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    lengths = [len(r.response_ids) for r in rollouts]
    return {"rollout/response_len": sum(lengths) / len(lengths),
            "rollout/truncated_rate": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "rollout/tokens": float(sum(lengths))}


def train(cfg: SafeRLConfig) -> dict[str, Any]:
    """Run one experiment end to end; returns the before/after evaluation."""
    configure_process()
    from rewards import load_recipe
    from rewards.base import RewardRules

    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and any(run_dir.iterdir()):  # never mix two runs' metrics or checkpoints
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = next(p for i in itertools.count() if not (p := run_dir.with_name(f"{run_dir.name}.{stamp}"
                                                                                + (f"-{i}" if i else ""))).exists())
        run_dir.rename(kept)
        print(f"[saferl] {run_dir} already held a run; moved it to {kept}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    recipe = load_recipe(cfg.reward.recipe)
    rules = RewardRules(**dataclasses.asdict(cfg.reward.rules))
    if cfg.helpfulness.model is None and cfg.reward.recipe in ("hybrid", "helpfulness_only"):
        raise ValueError(f"reward.recipe={cfg.reward.recipe} needs a helpfulness model, but helpfulness.model "
                         "is null")
    train_prompts = load_prompts(resolve(cfg.data.train, cfg))
    eval_prompts = load_prompts(resolve(cfg.eval.prompts, cfg))
    if cfg.eval.max_prompts and len(eval_prompts) > cfg.eval.max_prompts:  # an even stride keeps every kind
        stride = len(eval_prompts) / cfg.eval.max_prompts
        eval_prompts = [eval_prompts[int(i * stride)] for i in range(cfg.eval.max_prompts)]
    print(format_plan(cfg), flush=True)
    if cfg.run.executor == "ray":
        check_resources(requests(plan(cfg)), start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.temp_dir))
    roles = build_roles(cfg)
    try:
        return _loop(cfg, roles, recipe, rules, train_prompts, eval_prompts, run_dir)
    finally:
        roles.shutdown()


def _loop(cfg: SafeRLConfig, roles: Roles, recipe: Any, rules: Any, train_prompts: list, eval_prompts: list,
          run_dir: Path) -> dict[str, Any]:
    G, r = cfg.rollout.samples_per_prompt, cfg.rollout
    sampling = dict(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
    sampler = PromptSampler(train_prompts, cfg.run.seed)
    weight_sync = BlobWeightSync(roles.trainer, roles.rollout)

    def run_eval() -> dict[str, float]:
        return evaluate(eval_prompts, roles.rollout, roles.guard, roles.helpfulness,
                        samples=cfg.eval.samples_per_prompt, seed=cfg.eval.seed, **sampling)

    tracker = Tracker(run_dir, total_steps=cfg.trainer.steps, wandb_mode=cfg.logging.wandb,
                      project=cfg.logging.project, config=json.loads(json.dumps(dataclasses.asdict(cfg))),
                      progress=cfg.logging.progress)
    before = run_eval()
    tracker.log(0, {f"eval/{k}": v for k, v in before.items()}, advance=False)
    roles.pop_compute_seconds()
    for step in range(1, cfg.trainer.steps + 1):
        timer, step_start = PhaseTimer(), time.monotonic()
        prompts = sampler.next_batch(cfg.data.prompts_per_step)
        with timer.phase("rollout"):
            rollouts = roles.rollout.map("generate", prompts, G, seed=cfg.run.seed * 1_000_003 + step * 10_007,
                                         offset_kwarg="first_group", **sampling)
        inputs = reward_inputs(rollouts, roles.guard, roles.helpfulness, timer=timer)
        rewards = recipe(inputs, rules)
        advantages = group_advantages(torch.tensor(rewards.total), G).tolist()
        with timer.phase("train"):
            train_metrics = roles.trainer.call("train_step", make_train_batch(rollouts, advantages))[0]
        with timer.phase("sync"):
            sent = weight_sync.push()
        step_seconds, compute = time.monotonic() - step_start, roles.pop_compute_seconds()
        metrics = {**{f"reward/{k}": v for k, v in rewards.metrics.items()},
                   **{f"train/{k}": v for k, v in train_metrics.items()}, **rollout_metrics(rollouts),
                   **{f"truth/{k}": v for k, v in ground_truth_metrics(rollouts, inputs.answer_verdicts).items()},
                   **timer.metrics(), "timing/step": step_seconds, "timing/compute": compute,
                   "timing/overhead_frac": max(0.0, 1.0 - compute / step_seconds), "sync/bytes": float(sent)}
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.trainer.steps:
            metrics.update({f"eval/{k}": v for k, v in run_eval().items()})
        tracker.log(step, metrics)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.trainer.steps:
            save_checkpoint(roles, run_dir, f"step_{step}", cfg.checkpoint.keep_last)
    after = run_eval()
    tracker.log(cfg.trainer.steps, {f"eval/{k}": v for k, v in after.items()}, advance=False)
    final = save_checkpoint(roles, run_dir, "final", keep_last=0)
    tracker.close()
    table = before_after_table(before, after)
    (run_dir / "eval.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    (run_dir / "eval.md").write_text(table + "\n")
    print(f"\nHeld-out evaluation ({len(eval_prompts)} prompts x {cfg.eval.samples_per_prompt} samples, "
          f"seed {cfg.eval.seed}):\n{table}\n\nfinal checkpoint: {final}\nmetrics: {run_dir / 'metrics.jsonl'}",
          flush=True)
    return {"before": before, "after": after, "checkpoint": final}


def save_checkpoint(roles: Roles, run_dir: Path, name: str, keep_last: int) -> str:
    """HF-format checkpoint under <run_dir>/checkpoints/<name>; keeps the newest `keep_last` step_* dirs."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    path = roles.trainer.call("save", str((root / name).resolve()))[0]
    if keep_last:
        steps = sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in steps[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path
