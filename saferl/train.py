"""The SafeRL driver: build the roles from config, then run the step loop in plain sight.

    prompts -> rollouts (vLLM) -> guard verdicts + helpfulness (each group as soon as it is generated)
            -> reward recipe -> group advantages -> GSPO minibatch updates -> weight sync -> metrics
            -> periodic eval and checkpoint

Roles are plain classes (`RolloutWorker`, `GuardScorer`, `HelpfulnessScorer`, `PolicyTrainer`) built by
`saferl.roles` and placed by `ActorGroup` as Ray actors (`run.executor: ray`) or in this process (`local`). The held-out evaluation runs
before the first step and after the last with the same seed, and the run ends with a before/after table.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from pathlib import Path
from typing import TypedDict

import torch
from omegaconf import OmegaConf

from rewards import RewardRecipe, apply_recipe, load_recipe
from saferl import checkpoint
from saferl.actor_group import check_ray_address, check_resources, start_ray
from saferl.cluster import Reservation, reserve
from saferl.config import SafeRLConfig, to_yaml
from saferl.data import Columns, PromptSampler, load_prompts, subsample
from saferl.eval.metrics import before_after_table
from saferl.eval.monitor import Monitor, stopped_by_alarm
from saferl.eval.policy_eval import evaluate, ground_truth_metrics
from saferl.placement import format_plan, needs_reference_logprobs, requests
from saferl.references import resolve_reference
from saferl.roles import Roles, build_roles, check_endpoints, role_specs, start_group
from saferl.runtime import configure_process
from saferl.scoring import generate_and_score, with_reference_logprobs
from saferl.tracking import PhaseTimer, Tracker, step_timing
from saferl.trainer.advantages import group_advantages, zero_variance_groups
from saferl.trainer.policy import merge_rank_metrics
from saferl.trainer.weight_sync import BucketWeightSync
from saferl.types import GroundTruth, Prompt, RewardInputs, Rollout, SafetyPolicy, ScoredRollout, TrainBatch


# The rollouts of one prompt, each with its verdicts, scores and reward.
Group = list[ScoredRollout]
# The tail probe's sampling round in the per-request seeds (the refill rounds are 0 .. rollout.refill_rounds).
PROBE_ROUND = 97


def rollout_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    lengths = [len(r.response_ids) for r in rollouts]
    return {"rollout/response_len": sum(lengths) / len(lengths),
            "rollout/truncated_rate": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "rollout/tokens": float(sum(lengths))}


def prepare_run_dir(cfg: SafeRLConfig) -> Path | None:
    """Create run.dir; returns the checkpoint to resume from, if any.

    With checkpoint.resume=auto an unfinished run continues from its latest checkpoint (a run that reached
    trainer.steps, or that the monitor's alarm stopped, counts as finished). Any other existing run is moved
    aside, never overwritten.
    """
    run_dir = Path(cfg.run.dir)
    if cfg.checkpoint.resume == "auto" and (ckpt := checkpoint.latest(run_dir)) is not None:
        state = checkpoint.read_state(ckpt)
        if state["step"] < cfg.trainer.steps and stopped_by_alarm(state) is None:
            if state["workers"] != cfg.trainer.workers:
                raise ValueError(f"{ckpt} was written by {state['workers']} trainer workers; resuming needs "
                                 f"trainer.workers={state['workers']} (got {cfg.trainer.workers})")
            record_resumed_config(run_dir, cfg, state["step"])
            print(f"[saferl] resuming {run_dir} from {ckpt} (step {state['step']})", flush=True)
            return ckpt
    if run_dir.exists() and any(run_dir.iterdir()):  # never mix two runs' metrics or checkpoints
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = next(p for i in itertools.count() if not (p := run_dir.with_name(f"{run_dir.name}.{stamp}"
                                                                                + (f"-{i}" if i else ""))).exists())
        run_dir.rename(kept)
        print(f"[saferl] {run_dir} already held a run; moved it to {kept}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return None


def record_resumed_config(run_dir: Path, cfg: SafeRLConfig, step: int) -> None:
    """Make `config.yaml` the config the run continues with. When it differs from the saved one, the saved one
    is kept as `config.until_step_<step>.yaml` (the steps it ran), and the changed keys are printed."""
    current, saved_file = to_yaml(cfg), run_dir / "config.yaml"
    saved = saved_file.read_text() if saved_file.exists() else ""
    if saved == current:
        return
    if saved:
        kept = run_dir / f"config.until_step_{step}.yaml"
        kept.write_text(saved)
        changed = _changed_keys(OmegaConf.to_container(OmegaConf.create(saved)), dataclasses.asdict(cfg))
        print(f"[saferl] warning: resuming with a changed config ({', '.join(changed) or 'formatting only'}); "
              f"steps 1-{step} ran with {kept}, {saved_file} is the config from step {step + 1} on", flush=True)
    saved_file.write_text(current)


def _changed_keys(old: object, new: object, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


TrainResult = TypedDict("TrainResult", {"before": dict[str, float], "after": dict[str, float], "checkpoint": str,
                                        "stopped_by_alarm": int | None})


def load_prompt_sets(cfg: SafeRLConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The training prompts (data.train under the data.* column mapping) and the held-out ones (eval.prompts,
    eval.max_prompts of them at an even stride, which keeps every kind), read by `saferl eval`'s loader."""
    d = cfg.data
    columns = Columns(prompt=d.prompt_column, kind=d.kind_column, kind_value=d.kind,
                      category=d.category_column)
    train = load_prompts(resolve_reference(d.train, cfg.toyworld), columns, d.split)
    held_out = load_prompts(resolve_reference(cfg.eval.prompts, cfg.toyworld))
    return train, subsample(held_out, cfg.eval.max_prompts)


def train(cfg: SafeRLConfig, truth: GroundTruth | None = None) -> TrainResult:
    """Run one experiment end to end (or continue an interrupted one); returns the before/after evaluation.
    `truth`, a ground-truth oracle (the CLI hands in the toy world's), adds the `truth_*` metrics."""
    configure_process(cfg.run.torch_threads)
    check_endpoints(cfg)  # before the toy world, Ray or any actor starts
    if cfg.run.executor == "ray" and cfg.ray.address:
        check_ray_address(cfg.ray.address)  # the same: a cold toy world would otherwise build first (minutes)
    recipe = load_recipe(cfg.reward.recipe)
    if cfg.helpfulness.model is None and cfg.reward.recipe in ("hybrid", "helpfulness_only"):
        raise ValueError(f"reward.recipe={cfg.reward.recipe} needs a helpfulness model, but helpfulness.model "
                         "is null")
    if cfg.run.executor == "local" and cfg.trainer.workers > 1:
        raise ValueError(f"trainer.workers={cfg.trainer.workers} needs run.executor=ray (data-parallel workers "
                         "are separate processes)")
    train_prompts, eval_prompts = load_prompt_sets(cfg)
    resume_from = prepare_run_dir(cfg)
    specs = role_specs(cfg)  # what --dry-run prints is what starts
    print(format_plan(specs, cfg), flush=True)
    reservation = Reservation(None, [])  # Ray: one placement group, every actor's bundle, before any starts
    if cfg.run.executor == "ray":
        resources = start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.temp_dir, cfg.run.torch_threads)
        check_resources(requests(specs), resources)
        reservation = reserve(specs, cfg.ray.placement_strategy, cfg.ray.placement_timeout_s)
    try:
        roles = build_roles(specs, start=functools.partial(start_group, reservation=reservation))
        try:
            return _loop(cfg, roles, recipe, cfg.reward.rules, train_prompts, eval_prompts, Path(cfg.run.dir),
                         resume_from, truth)
        finally:
            roles.shutdown()
    finally:
        reservation.release()


def _loop(cfg: SafeRLConfig, roles: Roles, recipe: RewardRecipe, rules: SafetyPolicy, train_prompts: list[Prompt],
          eval_prompts: list[Prompt], run_dir: Path, resume_from: Path | None,
          truth: GroundTruth | None) -> TrainResult:
    G, r = cfg.rollout.samples_per_prompt, cfg.rollout
    sampling = dict(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
    sampler = PromptSampler(train_prompts, cfg.run.seed)
    reference = needs_reference_logprobs(cfg)
    weight_sync = BucketWeightSync(roles.trainer, roles.rollout, cfg.trainer.sync_bucket_mb << 20)
    m = cfg.monitor  # the reward-hacking early warning: judges a sample of each step's batch again, reads only
    monitor = Monitor(sample=m.sample, implausible_logprob=m.implausible_logprob, judge=roles.judge,
                      trainer=roles.trainer, safety=rules, truth=truth, alarm_metric=m.alarm.metric,
                      threshold=m.alarm.threshold, patience=m.alarm.patience, window=m.alarm.window,
                      action=m.alarm.action,
                      seed=cfg.run.seed)

    def run_eval() -> dict[str, float]:
        return evaluate(eval_prompts, roles.rollout, roles.guard, roles.helpfulness, safety=rules,
                        samples=cfg.eval.samples_per_prompt, seed=cfg.eval.seed, **sampling, truth=truth,
                        judge=roles.judge)

    def sample(prompts: list[Prompt], step: int, round_: int, timer: PhaseTimer, **override: float) -> list[Group]:
        scored = generate_and_score(roles.rollout, prompts, G, roles.guard, roles.helpfulness, timer=timer,
                                    **(sampling | override),
                                    seed=cfg.run.seed * 1_000_003 + step * 10_007 + round_ * 100_019)
        if reference:  # the fluency gate and the monitor read what the starting policy thinks of each answer
            scored = with_reference_logprobs(scored, roles.trainer, timer)
        return groups_of(apply_recipe(recipe, scored, rules))

    def advantages_of(groups: list[Group]) -> list[float]:
        return group_advantages(torch.tensor([s.reward for group in groups for s in group]), G,
                                normalize_std=cfg.trainer.normalize_std).tolist()

    def save(name: str, step: int, keep_last: int) -> Path:
        state = {"step": step, "sampler": sampler.state_dict(), "workers": cfg.trainer.workers,
                 "monitor": monitor.state_dict()}
        return checkpoint.save(run_dir, name, roles.trainer, state, keep_last, cfg.checkpoint.lora_export)

    start = 0
    if resume_from is not None:  # trainer state and data position from the checkpoint; engines get its weights
        start = checkpoint.read_state(resume_from)["step"]
        roles.trainer.load(str(resume_from))
        sampler.load_state_dict(checkpoint.read_state(resume_from)["sampler"])
        if (saved := checkpoint.read_state(resume_from).get("monitor")) is not None:  # none before #16.2
            monitor.load_state_dict(saved)
        weight_sync.push()
    tracker = Tracker(run_dir, total_steps=cfg.trainer.steps, wandb_mode=cfg.logging.wandb,
                      project=cfg.logging.project, config=json.loads(json.dumps(dataclasses.asdict(cfg))),
                      progress=cfg.logging.progress, start_step=start)
    before_file = run_dir / "eval_before.json"
    if before_file.exists() and resume_from is not None:
        before = json.loads(before_file.read_text())
    else:
        before = run_eval()
        before_file.write_text(json.dumps(before, indent=2))
        tracker.log(0, {f"eval/{k}": v for k, v in before.items()}, advance=False)
    roles.pop_compute()  # the evaluation's compute is not a step's
    for step in range(start + 1, cfg.trainer.steps + 1):
        timer, step_start = PhaseTimer(), time.time()  # the roles' compute intervals are time.time()
        rounds = [sample(sampler.next_batch(cfg.data.prompts_per_step), step, 0, timer)]
        if cfg.trainer.drop_zero_variance_groups:  # refill with fresh prompts until the batch is informative
            while len(rounds) <= r.refill_rounds and (missing := cfg.data.prompts_per_step - sum(
                    n_informative(groups) for groups in rounds)) > 0:
                rounds.append(sample(sampler.next_batch(missing), step, len(rounds), timer))
        trained = select_groups(rounds, cfg.trainer.drop_zero_variance_groups, cfg.data.prompts_per_step)
        records = [s for group in trained for s in group]
        metrics = {**trained_metrics(trained, rounds, recipe, rules, truth),
                   "batch/groups": float(len(trained)), "batch/rounds": float(len(rounds))}
        advantages: list[float] = []
        if records:  # every group may have been uninformative
            advantages = advantages_of(trained)
            with timer.phase("train"):
                per_rank = roles.trainer.train_step(TrainBatch.of(records, advantages))
            metrics.update({f"train/{k}": v for k, v in merge_rank_metrics(per_rank).items()})
            with timer.phase("sync"):
                metrics["sync/bytes"] = float(weight_sync.push())
        probe = None
        if m.probe_top_p is not None and trained:  # the tail the sampler cuts: what would the reward pay for it?
            with timer.phase("probe"):
                groups = sample(monitor.prompts(step, trained), step, PROBE_ROUND, PhaseTimer(), top_p=m.probe_top_p)
                probe = groups, advantages_of(groups)
        # monitor/*, after the update it cannot change
        metrics.update(monitor.observe(step, trained, advantages, timer, probe))
        step_window, compute = (step_start, time.time()), roles.pop_compute()
        metrics.update(roles.failure_counters())  # cumulative: guard/*, rm/* and their actors' restarts
        # Overhead: the step's time with no role computing (scoring overlapping generation counts once).
        metrics.update({**timer.metrics(), **step_timing(step_window, compute)})
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.trainer.steps:
            metrics.update({f"eval/{k}": v for k, v in run_eval().items()})
        tracker.log(step, metrics)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.trainer.steps:
            save(f"step_{step}", step, cfg.checkpoint.keep_last)
        if monitor.fired(step):  # the reward-hacking alarm, once: warn, also save a checkpoint, or stop here
            tracker.write(monitor.alarm_message())
            if m.alarm.action == "checkpoint":
                save(f"alarm_step_{step}", step, cfg.checkpoint.keep_last)
            if monitor.stopped_at is not None:
                break
    last = monitor.stopped_at or cfg.trainer.steps
    after = run_eval()
    tracker.log(last, {f"eval/{k}": v for k, v in after.items()}, advance=False)
    final = save("final", last, keep_last=0)
    tracker.close()
    table = before_after_table(before, after)
    stopped = monitor.stopped_at
    evals = {"before": before, "after": after, "stopped_by_alarm": stopped}
    (run_dir / "eval.json").write_text(json.dumps(evals, indent=2))
    (run_dir / "eval.md").write_text(table + "\n")
    print(f"\nHeld-out evaluation ({len(eval_prompts)} prompts x {cfg.eval.samples_per_prompt} samples, "
          f"seed {cfg.eval.seed}):\n{table}\n\nfinal checkpoint: {final}\nmetrics: {run_dir / 'metrics.jsonl'}",
          flush=True)
    if stopped is not None:
        print(f"STOPPED by the reward-hacking alarm after step {stopped} of {cfg.trainer.steps}: "
              f"{m.alarm.metric} >= {m.alarm.threshold:g} for {m.alarm.patience} monitored steps", flush=True)
    return {"before": before, "after": after, "checkpoint": str(final), "stopped_by_alarm": stopped}


def groups_of(records: list[ScoredRollout]) -> list[Group]:
    """Split one round's records (in group order, as `generate_and_score` returns them) into its groups."""
    return [list(group) for _, group in itertools.groupby(records, key=lambda s: s.rollout.group)]


def is_informative(group: Group) -> bool:
    """The group's rewards are not all equal (compared as the advantages see them, in float32)."""
    return not bool(zero_variance_groups(torch.tensor([s.reward for s in group]), len(group)))


def n_informative(groups: list[Group]) -> int:
    return sum(is_informative(group) for group in groups)


def select_groups(rounds: list[list[Group]], drop_zero_variance: bool, max_groups: int) -> list[Group]:
    """The groups to train on: every group of the first round, or (dropping zero-variance groups) the
    informative groups of all rounds in order, at most `max_groups`."""
    if not drop_zero_variance:
        return rounds[0][:max_groups]
    return [group for groups in rounds for group in groups if is_informative(group)][:max_groups]


def trained_metrics(trained: list[Group], rounds: list[list[Group]], recipe: RewardRecipe,
                    rules: SafetyPolicy, truth: GroundTruth | None = None) -> dict[str, float]:
    """`reward/*`, `truth/*` and `rollout/*` of the records that were trained on (the recipe's batch metrics
    recomputed over them), or, when no group was informative, of everything generated this step (`batch/groups`
    is then 0)."""
    described = [s for group in trained for s in group] or [s for groups in rounds for group in groups
                                                             for s in group]
    if not described:
        return {}
    reward = recipe(RewardInputs.of(described), rules).metrics
    rollouts = [s.rollout for s in described]
    rates = ground_truth_metrics(rollouts, [s.answer_verdict for s in described], truth)
    return {**{f"reward/{k}": v for k, v in reward.items()}, **{f"truth/{k}": v for k, v in rates.items()},
            **rollout_metrics(rollouts)}
