"""`saferl chat`: talk to a policy under CARE, or measure CARE off vs on on a held-out prompt set.

Owns the comparison behind `saferl chat --eval`: the same policy answers every prompt twice with the same
seeds, once plainly and once under CARE (`saferl.care.care_generate`), and both answer sets are judged as
`saferl eval` judges them (`saferl.eval.run.score` / `metrics_of`: the Gen guard, the helpfulness RM, and
a ground-truth oracle's `truth_*` rates when one is handed in: the CLI hands in the toy world's). Beside
those rates it reports CARE's own costs: wait tokens (`ResponseState.wait_tokens`: generated tokens the user
never receives, averaged over all responses), rollbacks per response, and how often the retries ran out.

Rows of the table: safety rate on harmful prompts (ground truth = 1 - the true unsafe rate, so a garbled
answer counts as safe; and as the Gen guard judges it), benign refusal (ground truth and guard), quality
(mean helpfulness RM score on benign prompts and the true helpful-answer rate on benign prompts), garbled
answers, then the CARE costs. Everything runs in this process; generation in batches of `batch_size` rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saferl.care import CareModels, CareSettings, ResponseState, answer_text, care_generate
from saferl.eval.metrics import format_value, markdown_table
from saferl.types import GroundTruth, Prompt, Rollout, SafetyPolicy

LABELS = ("CARE off", "CARE on")
ROWS: tuple[tuple[str, str], ...] = (
    ("truth_safety_rate", "safety rate (harmful, ground truth)"),
    ("safety_rate", "safety rate (harmful, Gen guard)"),
    ("truth_benign_refusal_rate", "benign refusal rate (ground truth)"),
    ("benign_refusal_rate", "benign refusal rate (Gen guard)"),
    ("benign_helpfulness", "quality: mean helpfulness (benign, RM)"),
    ("truth_benign_helpful_rate", "quality: helpful answers (benign, ground truth)"),
    ("truth_garbled_rate", "garbled answers (ground truth)"),
    ("wait_tokens", "wait tokens (mean per response)"),
    ("wait_tokens/harmful", "wait tokens: harmful prompts"),
    ("wait_tokens/benign", "wait tokens: benign prompts"),
    ("wait_tokens/rolled_back", "wait tokens: responses rolled back"),
    ("retries", "retries (mean per response)"),
    ("rollback_rate/harmful", "rolled back at least once: harmful"),
    ("rollback_rate/benign", "rolled back at least once: benign"),
    ("fallback_rate", "retries exhausted (fallback or kept)"),
    ("generated_tokens", "generated tokens (mean per response)"),
    ("samples", "samples"),
)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def care_stats(prompts: list[Prompt], states: list[ResponseState]) -> dict[str, float]:
    """CARE's costs over responses (`prompts[i]` answered by `states[i]`): mean wait tokens (all, per kind,
    over rolled-back responses), mean retries, rollback rates per kind, exhausted rate, generated tokens."""
    def rows(kind: str | None) -> list[ResponseState]:
        return [s for p, s in zip(prompts, states) if kind is None or p.kind == kind]

    out = {"wait_tokens": _mean([s.wait_tokens for s in states]),
           "wait_tokens/rolled_back": _mean([s.wait_tokens for s in states if s.retries]),
           "retries": _mean([s.retries for s in states]),
           "fallback_rate": _mean([float(s.fallback or s.flagged) for s in states]),
           "generated_tokens": _mean([s.generated for s in states])}
    for kind in ("harmful", "benign"):
        out[f"wait_tokens/{kind}"] = _mean([s.wait_tokens for s in rows(kind)])
        out[f"rollback_rate/{kind}"] = _mean([float(s.retries > 0) for s in rows(kind)])
    return out


def generate(models: CareModels, prompts: list[Prompt], settings: CareSettings, *, care: bool, seed: int,
             samples: int, batch_size: int) -> tuple[list[Rollout], list[ResponseState]]:
    """`samples` answers per prompt (row seed = seed + prompt index * samples + sample index), grouped in
    prompt order, as Rollouts for the judges plus their CARE states."""
    from saferl.care import chat_ids
    from saferl.rollout.worker import split_thinking

    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(samples)]
    seeds = [seed + k for k in range(len(rows))]
    states: list[ResponseState] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        states += care_generate(models, [p.messages for _, p in chunk], seeds[start : start + batch_size],
                                settings, care=care)
    rollouts = []
    for (i, p), st in zip(rows, states):
        text = answer_text(models.tokenizer, st, settings)
        thinking, answer = split_thinking(text)
        rollouts.append(Rollout(prompt=p, prompt_ids=chat_ids(models.tokenizer, p.messages),
                                response_ids=list(st.committed), logprobs=[], text=text, thinking=thinking,
                                answer=answer, finish_reason=st.finish_reason, group=i))
    return rollouts, states


def compare_care(models: CareModels, prompts: list[Prompt], settings: CareSettings, *, seed: int, samples: int,
                 batch_size: int, guard_kwargs: dict[str, Any], rm_kwargs: dict[str, Any] | None,
                 safety: SafetyPolicy, log: Any = print, truth: GroundTruth | None = None
                 ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Metrics per label (`LABELS`) and one row per (prompt, sample) with both answers and CARE's record;
    `truth` (a ground-truth oracle, if any) adds the `truth_*` rates."""
    from saferl.eval.policy_eval import true_styles
    from saferl.eval.run import metrics_of, score

    answers, states, seconds = {}, {}, {}
    for label, care in zip(LABELS, (False, True)):
        log(f"[chat] {label}: {samples} x {len(prompts)} answers")
        start = time.monotonic()
        answers[label], states[label] = generate(models, prompts, settings, care=care, seed=seed, samples=samples,
                                                 batch_size=batch_size)
        seconds[label] = time.monotonic() - start
    log(f"[chat] judging with {guard_kwargs['model']}" + (f" and {rm_kwargs['model']}" if rm_kwargs else ""))
    scored = score(answers, guard_kwargs=guard_kwargs, rm_kwargs=rm_kwargs)
    results = {}
    for label in LABELS:
        rollouts = answers[label]
        metrics = metrics_of(scored[label], safety, truth)
        styles = true_styles(rollouts, truth)
        if styles is not None:
            metrics["truth_safety_rate"] = 1.0 - metrics["truth_unsafe_rate"]
        metrics.update(care_stats([r.prompt for r in rollouts], states[label]))
        metrics["generation_seconds"] = seconds[label]
        results[label] = metrics
    rows = []
    for k, (off, on) in enumerate(zip(answers[LABELS[0]], answers[LABELS[1]])):
        st = states[LABELS[1]][k]
        rows.append({"prompt_id": off.prompt.id, "kind": off.prompt.kind, "prompt": off.prompt.text,
                     "care_off": off.answer, "care_on": on.answer, "retries": st.retries,
                     "wait_tokens": st.wait_tokens, "fallback": st.fallback, "flagged": st.flagged,
                     "rolled_back": [models.tokenizer.decode(t, skip_special_tokens=False) for t in st.rolled_back],
                     "off_safety": _label(scored[LABELS[0]][k].answer_verdict.safety),
                     "on_safety": _label(scored[LABELS[1]][k].answer_verdict.safety)})
    return results, rows


def _label(safety: Any) -> str | None:
    return safety.value if safety is not None else None


def care_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per metric of `ROWS` present, columns CARE off, CARE on and the change."""
    off, on = (results[label] for label in LABELS)
    rows = []
    for key, name in ROWS:
        if key not in off and key not in on:
            continue
        digits = 0 if key == "samples" else 1 if "tokens" in key else 3
        a, b = off.get(key), on.get(key)
        change = b - a if a is not None and b is not None and math.isfinite(b - a) else None
        rows.append([name, format_value(a, digits), format_value(b, digits),
                     "–" if change is None or key == "samples" else f"{change:+.{digits}f}"])
    return markdown_table(["held-out metric", *LABELS, "change"], rows)


def run_care_eval(*, policy: str, stream_guard: str, prompts: str, settings: CareSettings, seed: int,
                  samples: int, max_prompts: int, batch_size: int, judge: str, rm: str | None, backend: str,
                  device: str | None, dtype: str, output: str | None,
                  resolve: Callable[[str], str],
                  truth: GroundTruth | None = None) -> dict[str, dict[str, float]]:
    """`saferl chat --eval` (see `saferl chat --help`): print the CARE off/on table, write JSON to `output`.
    `resolve` turns each model and prompt-set reference into a path or hub id (the CLI's resolves
    `toyworld:<part>`); the table and settings name the references as given. `truth` is the ground-truth
    oracle, if any (the CLI hands in the toy world's)."""
    from saferl.config import GuardConfig, HelpfulnessConfig
    from saferl.data import Columns, load_prompts, subsample
    from saferl.runtime import check_model_dir, configure_process

    prompt_set = subsample(load_prompts(resolve(prompts), Columns(), require_kind=True), max_prompts)
    paths = {name: resolve(ref) for name, ref in
             (("policy", policy), ("stream_guard", stream_guard), ("judge", judge), ("rm", rm)) if ref}
    for path in paths.values():
        check_model_dir(path)  # before any model loads
    configure_process()
    from saferl.care import load_care_models

    models = load_care_models(paths["policy"], paths["stream_guard"], device=device, dtype=dtype)
    g, h = GuardConfig, HelpfulnessConfig
    guard_kwargs = dict(model=paths["judge"], backend=backend, max_new_tokens=g.max_new_tokens,
                        max_model_len=g.max_model_len, dtype=g.dtype)
    rm_kwargs = (dict(model=paths["rm"], backend="hf", dtype=h.dtype, batch_size=h.batch_size,
                      max_length=h.max_length) if rm else None)
    results, rows = compare_care(models, prompt_set, settings, seed=seed, samples=samples, batch_size=batch_size,
                                 guard_kwargs=guard_kwargs, rm_kwargs=rm_kwargs,
                                 safety=SafetyPolicy(),  # the reward.rules defaults
                                 log=lambda msg: print(msg, flush=True), truth=truth)
    kinds: dict[str, int] = {}
    for p in prompt_set:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    mix = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    heading = (f"CARE off vs on: {policy} watched by {stream_guard} on {prompts} ({mix} prompts x {samples}, "
               f"seed {seed}, temperature {settings.temperature:g}); buffer {settings.buffer_tokens} tokens, "
               f"at most {settings.max_retries} retries, on exhausted: {settings.on_exhausted}; judged by "
               f"{judge} and {rm or 'no RM'}.")
    print(f"\n{heading}\n\n{care_table(results)}", flush=True)
    if output:
        from dataclasses import asdict

        finite = {label: {k: v if math.isfinite(v) else None for k, v in m.items()} for label, m in results.items()}
        blob = {"settings": {"policy": policy, "stream_guard": stream_guard, "prompts": prompts, "kinds": kinds,
                             "seed": seed, "samples_per_prompt": samples, "judge": judge, "rm": rm,
                             "care": asdict(settings)},
                "results": finite, "table": care_table(results), "samples": rows}
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(blob, indent=2, default=str) + "\n")
        print(f"\n[chat] wrote {output}", flush=True)
    return results


def chat(models: CareModels, messages: list[dict[str, str]], settings: CareSettings, *, seed: int,
         care: bool = True) -> tuple[str, ResponseState]:
    """One answer to `messages` (ending with a user turn): the text the user sees and CARE's record."""
    state = care_generate(models, [messages], [seed], settings, care=care)[0]
    return answer_text(models.tokenizer, state, settings), state


def describe_intervention(state: ResponseState, settings: CareSettings) -> str:
    """One line saying whether CARE intervened, how often, and at what cost."""
    if not state.retries and not state.fallback and not state.flagged:
        return "[care] no intervention"
    parts = [f"{state.retries} rollback{'s' if state.retries != 1 else ''}",
             f"{state.wait_tokens} wait tokens"]
    if state.fallback:
        parts.append(f"retries exhausted: fallback refusal after {settings.max_retries} retries")
    elif state.flagged:
        parts.append("retries exhausted: the last attempt was kept although the guard flagged it")
    return "[care] intervened: " + ", ".join(parts)
