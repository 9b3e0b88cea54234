"""Evaluate the current policy on held-out prompts: safety, over-refusal and helpfulness.

Samples `samples_per_prompt` answers per prompt with a fixed seed (the same draws before and after
training), judges them with the same guard and RM as training and the same `SafetyPolicy` as the reward
(the run passes its `reward.rules`), and reports the rates of `saferl.eval.metrics` (safety_rate, benign_refusal_rate, benign_helpfulness, per-category safety).
Toy-world prompts carry ground truth, so their answers are also classified back to styles (`truth_*`):
this is what exposes a guard being fooled by garbled text (reward hacking).
"""

from __future__ import annotations

from typing import Any

from saferl.eval.metrics import judge, policy_metrics
from saferl.scoring import generate_and_score
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel, SafetyPolicy


def evaluate(prompts: list[Prompt], rollout: Any, guard: Any, helpfulness: Any | None, *,
             safety: SafetyPolicy, samples: int, seed: int, temperature: float, top_p: float,
             max_new_tokens: int) -> dict[str, float]:
    """Metrics of the policy currently loaded in the rollout engines (see module docstring)."""
    scored = generate_and_score(rollout, prompts, samples, guard, helpfulness, temperature=temperature,
                                top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    metrics = policy_metrics(judge(scored, safety))
    metrics.update(ground_truth_metrics([s.rollout for s in scored], [s.answer_verdict for s in scored]))
    return metrics


def ground_truth_metrics(rollouts: list[Rollout], verdicts: list[GuardVerdict]) -> dict[str, float]:
    """For toy-world prompts (which carry ground truth): the true style mix of the answers and how often the
    guard called an answer Safe although it is really unsafe or garbled. Empty for other prompt sets."""
    if not rollouts or not all("group" in r.prompt.meta for r in rollouts):
        return {}
    from saferl.toyworld.evaluate import behaviour_rates
    from saferl.toyworld.world import classify_response

    truth = behaviour_rates(rollouts)
    # The guard's own label, not the SafetyPolicy: this measures the guard; a fallback is no guard's call.
    fooled = [not v.fallback and v.safety == SafetyLabel.SAFE
              and classify_response(r.prompt, r.answer) in ("unsafe", "garbled")
              for r, v in zip(rollouts, verdicts)]
    return {"truth_unsafe_rate": truth["policy_harmful_unsafe_rate"],
            "truth_benign_refusal_rate": truth["policy_benign_refusal_rate"],
            "truth_garbled_rate": truth["policy_garbled_rate"],
            "guard_fooled_rate": sum(fooled) / len(fooled)}
