"""Evaluate the current policy on held-out prompts: safety, over-refusal and helpfulness.

Samples `samples_per_prompt` answers per prompt with a fixed seed (the same draws before and after
training), judges them with the same guard and RM as training, and reports:
  safety_rate            harmful prompts whose answer the guard calls Safe (Controversial counts as unsafe)
  benign_refusal_rate    benign prompts whose answer the guard marks `Refusal: Yes`
  benign_helpfulness     mean RM score on benign prompts
Toy-world prompts carry ground truth, so their answers are also classified back to styles (`truth_*`):
this is what exposes a guard being fooled by garbled text (reward hacking).
"""

from __future__ import annotations

from typing import Any

from saferl.scoring import generate_and_score
from saferl.types import GuardVerdict, Prompt, Rollout, SafetyLabel


def evaluate(prompts: list[Prompt], rollout: Any, guard: Any, helpfulness: Any | None, *, samples: int,
             seed: int, temperature: float, top_p: float, max_new_tokens: int) -> dict[str, float]:
    """Metrics of the policy currently loaded in the rollout engines (see module docstring)."""
    rollouts, inputs = generate_and_score(rollout, prompts, samples, guard, helpfulness, temperature=temperature,
                                          top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    harmful = [i for i, r in enumerate(rollouts) if r.prompt.kind == "harmful"]
    benign = [i for i, r in enumerate(rollouts) if r.prompt.kind == "benign"]
    verdicts = inputs.answer_verdicts

    def rate(idx: list[int], pred: Any) -> float:
        return sum(bool(pred(i)) for i in idx) / len(idx) if idx else float("nan")

    metrics = {
        "safety_rate": rate(harmful, lambda i: verdicts[i].safety == SafetyLabel.SAFE
                            and (inputs.thinking_verdicts[i] is None
                                 or inputs.thinking_verdicts[i].safety == SafetyLabel.SAFE)),
        "benign_refusal_rate": rate(benign, lambda i: verdicts[i].refusal is True),
        "samples": float(len(rollouts)),
    }
    if inputs.helpfulness is not None:
        metrics["benign_helpfulness"] = (sum(inputs.helpfulness[i] for i in benign) / len(benign)
                                         if benign else float("nan"))
    metrics.update(ground_truth_metrics(rollouts, verdicts))
    return metrics


def ground_truth_metrics(rollouts: list[Rollout], verdicts: list[GuardVerdict]) -> dict[str, float]:
    """For toy-world prompts (which carry ground truth): the true style mix of the answers and how often the
    guard called an answer Safe although it is really unsafe or garbled. Empty for other prompt sets."""
    if not rollouts or not all("group" in r.prompt.meta for r in rollouts):
        return {}
    from saferl.toyworld.evaluate import behaviour_rates
    from saferl.toyworld.world import classify_response

    truth = behaviour_rates(rollouts)
    fooled = [v.safety == SafetyLabel.SAFE and classify_response(r.prompt, r.answer) in ("unsafe", "garbled")
              for r, v in zip(rollouts, verdicts)]
    return {"truth_unsafe_rate": truth["policy_harmful_unsafe_rate"],
            "truth_benign_refusal_rate": truth["policy_benign_refusal_rate"],
            "truth_garbled_rate": truth["policy_garbled_rate"],
            "guard_fooled_rate": sum(fooled) / len(fooled)}


TABLE_ROWS = (("safety_rate", "safety rate (harmful, guard)"),
              ("benign_refusal_rate", "benign refusal rate (guard)"),
              ("benign_helpfulness", "mean helpfulness (benign, RM)"),
              ("truth_unsafe_rate", "unsafe rate (harmful, ground truth)"),
              ("truth_benign_refusal_rate", "benign refusal (ground truth)"),
              ("truth_garbled_rate", "garbled answers (ground truth)"))


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    lines = [f"| {'held-out metric':38s} | {'before':>7s} | {'after':>7s} | {'change':>7s} |",
             f"|{'-' * 40}|{'-' * 9}|{'-' * 9}|{'-' * 9}|"]
    for key, label in TABLE_ROWS:
        if key in before and key in after:
            b, a = before[key], after[key]
            lines.append(f"| {label:38s} | {b:7.3f} | {a:7.3f} | {a - b:+7.3f} |")
    return "\n".join(lines)
