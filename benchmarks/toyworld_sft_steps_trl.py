"""Training steps of the toy world's three models, the hand-written loop (`saferl.sft`) against TRL with SafeRL's
batches and heads (`saferl.sft_batched`: trl.SFTTrainer for the guard and the policy, transformers.Trainer for
the RM), on the build's own data, recipe and initial weights: the part of `toyworld_build_trl.py` that fits a
loaded machine.

Per model and round, both sides train `--steps` steps from the same fresh model, one after the other in this
process; the CPU time of this process (one torch thread: the time it ran, not the time it waited for a core) and
the wall time are recorded, trainer construction included. Check: both sides' first-step loss agree to 1e-4
(the same first batch and weights; the Trainer's warm-up starts from lr 0, so later steps differ slightly), else
exit 1. Reads the tokenizers of the cached world (never writes there).

    .venv/bin/python benchmarks/toyworld_sft_steps_trl.py --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

PARTS = ("guard", "policy", "reward_model")


def train(side: str, part: str, tok, examples, cfg, steps: int) -> tuple[list[float], float, float]:
    from saferl.sft import train_causal_lm, train_regression
    from saferl.sft_batched import train_causal_lm_trl, train_regression_hf
    from saferl.toyworld.build import new_model

    sft = getattr(cfg, "reward_model_sft" if part == "reward_model" else f"{part}_sft")
    shape = getattr(cfg, part)
    model = new_model(shape, tok, head="score" if part == "reward_model" else "lm", seed=cfg.seed)
    args = dict(steps=steps, batch_size=sft.batch_size, lr=sft.lr, warmup_steps=sft.warmup_steps, seed=cfg.seed,
                log_every=1)
    cpu, wall = time.process_time(), time.monotonic()
    if part == "reward_model":
        pairs = dict(pair_weight=1.0, group_size=6 + cfg.perturbations)
        fn = train_regression if side == "saferl" else train_regression_hf
        losses = fn(model, examples, pad_id=tok.pad_token_id, **pairs, **args)
    elif side == "saferl":
        losses = train_causal_lm(model, examples, pad_id=tok.pad_token_id, share_prefix=part == "guard", label=part,
                                 **args)
    else:
        losses = train_causal_lm_trl(model, tok, examples, share_prefix=part == "guard", **args)
    return losses, time.process_time() - cpu, time.monotonic() - wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--world", default=None, help="cached world to read tokenizers from (default: the config's)")
    args = parser.parse_args()
    from saferl.runtime import configure_process

    configure_process()
    import contextlib
    import io

    from transformers import AutoTokenizer

    from saferl.config import ToyWorldConfig
    from saferl.toyworld import world
    from saferl.toyworld.build import _guard_examples, _policy_examples, _rm_examples, toyworld_paths

    cfg = ToyWorldConfig()
    root = args.world or str(toyworld_paths(cfg).root)
    prompts = world.make_prompts("train")
    results, failures, loads = {}, [], [os.getloadavg()[0]]
    for part in PARTS:
        tok = AutoTokenizer.from_pretrained(f"{root}/{part}")
        examples = {"guard": lambda: _guard_examples(tok, prompts, cfg.perturbations, cfg.seed),
                    "policy": lambda: _policy_examples(tok, cfg),
                    "reward_model": lambda: _rm_examples(tok, prompts, cfg.seed, cfg.perturbations)}[part]()
        for _ in range(args.rounds):
            for side in ("saferl", "trl"):
                with contextlib.redirect_stdout(io.StringIO()):  # the per-step log lines of both trainers
                    losses, cpu, wall = train(side, part, tok, examples, cfg, args.steps)
                results.setdefault((part, side), []).append((cpu, wall, losses))
                loads.append(os.getloadavg()[0])
                print(f"  {part:13} {side:7} cpu {cpu:7.1f}s wall {wall:7.1f}s first loss {losses[0]:.6f} "
                      f"last {losses[-1]:.4f} (load {loads[-1]:.1f})", flush=True)
        first = {side: results[(part, side)][0][2][0] for side in ("saferl", "trl")}
        if abs(first["saferl"] - first["trl"]) > 1e-4:
            failures.append(f"{part}: first-step loss {first['saferl']:.6f} (saferl) vs {first['trl']:.6f} (trl)")
    print(f"\n# {args.steps} steps per model, {args.rounds} rounds, interleaved; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'model':14}{'saferl cpu s':>13}{'trl cpu s':>11}{'cpu ratio':>11}{'saferl wall':>13}{'trl wall':>10}")
    for part in PARTS:
        med = {side: [statistics.median(r[i] for r in results[(part, side)]) for i in (0, 1)]
               for side in ("saferl", "trl")}
        print(f"{part:14}{med['saferl'][0]:>13.1f}{med['trl'][0]:>11.1f}{med['trl'][0] / med['saferl'][0]:>10.2f}x"
              f"{med['saferl'][1]:>13.1f}{med['trl'][1]:>10.1f}")
    for line in failures:
        print(f"CHECK FAILED: {line}")
    print("check: " + ("FAILED" if failures else "first-step losses agree on every model"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
