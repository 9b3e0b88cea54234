"""Which sampled answer tokens the fluency gate's threshold flags, by prompt kind and true answer style.

For each policy checkpoint: HF-sample prompts (training or held-out set) at temperature 1, score every response
token under the policy itself and under the frozen starting policy (toyworld:policy), and count the tokens whose
reference log-prob is below the threshold (reward.rules.fluency_min_logprob = -4), with the policy's own
probability of them, split by the prompt's kind and the answer's true style (the toy world's ground truth).

    .venv/bin/python experiments/2026-12-01-reward-hacking/round4/flagged_tokens.py \
        runs/reward_hacking/combo-s1/checkpoints/final runs/reward_hacking_round4/ul10-s1/checkpoints/final
"""

from __future__ import annotations

import argparse
import collections
import math

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--prompts", default="toyworld:train")
    ap.add_argument("--max-prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=-4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saferl.data import load_prompts, subsample
    from saferl.references import resolve_reference
    from saferl.toyworld.oracle import ToyGroundTruth

    torch.set_num_threads(1)
    truth = ToyGroundTruth()
    prompts = subsample(load_prompts(resolve_reference(args.prompts)), args.max_prompts)
    reference = AutoModelForCausalLM.from_pretrained(resolve_reference("toyworld:policy")).eval()
    for ckpt in args.checkpoints:
        tok = AutoTokenizer.from_pretrained(ckpt)
        policy = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        torch.manual_seed(args.seed)
        stats: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0, 0, 0.0, 0.0])
        for prompt in prompts:
            text = tok.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = policy.generate(ids.repeat(args.samples, 1), do_sample=True, temperature=1.0, top_p=1.0,
                                      top_k=0, max_new_tokens=48, pad_token_id=tok.pad_token_id)
                for row in out:
                    response = row[ids.shape[1]:]
                    keep = (response != tok.pad_token_id).nonzero()
                    n = int(keep.max()) + 1 if len(keep) else 0
                    if n == 0:
                        continue
                    full = row[None, : ids.shape[1] + n]
                    targets = full[0, ids.shape[1]:]
                    lp_pol = torch.log_softmax(policy(full).logits[0, ids.shape[1] - 1:-1], -1)
                    lp_ref = torch.log_softmax(reference(full).logits[0, ids.shape[1] - 1:-1], -1)
                    pol = lp_pol.gather(-1, targets[:, None])[:, 0]
                    ref = lp_ref.gather(-1, targets[:, None])[:, 0]
                    flagged = ref < args.threshold
                    answer = tok.decode(targets, skip_special_tokens=True)
                    style = truth.style(prompt, answer) or "?"
                    s = stats[(prompt.kind, style)]
                    s[0] += 1
                    s[1] += int(flagged.any())
                    s[2] += int(flagged.sum())
                    s[3] += float(pol[flagged].exp().sum())
                    s[4] += float(pol[flagged].exp().gt(0.1).sum())
        total = sum(s[0] for s in stats.values())
        flagged_tokens = sum(s[2] for s in stats.values())
        print(f"\n{ckpt}: {total} answers to {len(prompts)} prompts of {args.prompts}, "
              f"{flagged_tokens} flagged tokens (reference log-prob < {args.threshold:g})")
        print("| kind | true style | answers | with a flagged token | flagged tokens | their mean policy p "
              "| flagged with policy p > 0.1 |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for (kind, style), s in sorted(stats.items()):
            print(f"| {kind} | {style} | {s[0]} | {s[1]} | {s[2]} | "
                  f"{s[3] / s[2] if s[2] else math.nan:.3f} | {s[4]} |")


if __name__ == "__main__":
    main()
