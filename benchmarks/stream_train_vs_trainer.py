"""Toy Stream-guard training: the hand-written loop (`train_stream_guard`, the toy world's build) against HF
`transformers.Trainer` with `stream_loss` as its `compute_loss_func` (`train_stream_guard_hf`, what `saferl
guard train-stream` runs): held-out quality and time, same data, seed and recipe.

The same work on both sides: the toy world's Stream guard as its build makes it (`saferl.toyworld.stream`:
heads on the toy Gen guard's backbone, seeded from the world's seed; the toy conversations of every training
prompt; max_position_embeddings 2048), the same steps of the same batch size, peak lr and warm-up, AdamW
without weight decay, cosine decay to 10%, clipping at 1, float32. What differs is the machinery: the batch
order (each side's own seeded sampler) and the Trainer's warm-up starting at lr 0 (ours at lr/warm-up).
Quality is `token_accuracy` on the held-out conversations (the world's held-out prompts), as the build's
`build.json` reports it. Sides run one after the other; times are the training calls' wall time.

Check: both sides start from identical weights, and `trainer_loss` (what the Trainer calls) equals
`stream_loss` on one batch of 8 from them, else exit 1; the held-out token risk accuracy of the Trainer side
may not fall more than --tolerance below the hand-written side's, else exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from record import recorded

ROOT = Path(__file__).resolve().parents[1]


def toy_stream_setup():
    """(fresh model factory, tokenizer, train examples, held-out examples, seed) as the toy build makes them."""
    from transformers import AutoTokenizer

    from saferl.config import load_config
    from saferl.guard.conversation import CHATML_TEMPLATE
    from saferl.guard.stream_data import LabelMaps
    from saferl.guard.stream_train import init_stream_guard
    from saferl.toyworld import world
    from saferl.toyworld.build import ensure_built
    from saferl.toyworld.stream import label_conversations, toy_examples

    cfg = load_config(str(ROOT / "configs" / "toy.yaml")).toyworld
    cfg.cache_dir = str(ROOT / cfg.cache_dir)
    root = ensure_built(cfg).root
    seed = json.loads((root / "config.json").read_text())["seed"]
    tokenizer = AutoTokenizer.from_pretrained(root / "guard")
    tokenizer.chat_template = CHATML_TEMPLATE

    def fresh():
        model = init_stream_guard(root / "guard", seed=seed)
        model.config.max_position_embeddings = 2048
        return model

    train_prompts, test_prompts = world.make_prompts("train"), world.make_prompts("heldout")
    by_id = {p.id: p for p in train_prompts + test_prompts}
    maps = LabelMaps.from_model(fresh())
    train = toy_examples(label_conversations(train_prompts, tokenizer), by_id, maps)
    heldout = toy_examples(label_conversations(test_prompts, tokenizer), by_id, maps)
    return fresh, tokenizer, train, heldout, seed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="a multiple of 10 (default: the toy build's 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="how far the Trainer's held-out token risk accuracy may fall below ours")
    parser.add_argument("--out", default=None, help="results Markdown file")
    args = parser.parse_args()
    from saferl.runtime import configure_process

    configure_process()
    with recorded(args.out):
        return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    from saferl.guard.stream_train import (
        collate,
        stream_loss,
        stream_training_args,
        token_accuracy,
        train_stream_guard,
        train_stream_guard_hf,
        trainer_collate,
        trainer_loss,
    )

    fresh, tokenizer, train, heldout, seed = toy_stream_setup()
    pad = tokenizer.pad_token_id
    ours, theirs = fresh(), fresh()
    same = all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    with torch.inference_mode():
        batch = collate(train[:8], pad)
        want = stream_loss(ours(batch["input_ids"]), batch)["loss"].item()
        split = trainer_collate(train[:8], pad)
        got = trainer_loss(theirs(split["input_ids"]), split["labels"]).item()
    print(f"{len(train)} training and {len(heldout)} held-out conversations; {args.steps} steps of "
          f"{args.batch_size}, lr {args.lr}, warm-up {args.warmup}, seed {seed}")
    print(f"check: identical initial weights {same}; loss on one batch of 8: stream_loss {want:.6f}, "
          f"trainer_loss {got:.6f}")
    if not same or abs(want - got) > 1e-6:
        print("FAIL: the two sides do not start from the same model and loss")
        return 1

    start = time.monotonic()
    losses = train_stream_guard(ours, train, pad_id=pad, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, warmup_steps=args.warmup, seed=seed, label="ours", log_every=50)
    ours_s = time.monotonic() - start
    with tempfile.TemporaryDirectory() as out:
        hf_args = stream_training_args(out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                       warmup_steps=args.warmup, seed=seed,
                                       overrides=["save_strategy=no", "disable_tqdm=true", "logging_steps=10",
                                                  "report_to=none"])
        start = time.monotonic()
        log = train_stream_guard_hf(theirs, train, pad_id=pad, args=hf_args)
        theirs_s = time.monotonic() - start
    a, b = token_accuracy(ours, heldout, pad_id=pad), token_accuracy(theirs, heldout, pad_id=pad)
    print(f"final loss (mean of the last 10 steps; the batch orders differ): ours "
          f"{sum(losses[-10:]) / len(losses[-10:]):.4f}, Trainer {log[-1]['loss']:.4f}")
    print(f"train seconds: ours {ours_s:.1f} ({ours_s / args.steps:.3f} s a step), Trainer {theirs_s:.1f} "
          f"({theirs_s / args.steps:.3f} s a step); Trainer / ours {theirs_s / ours_s:.2f}x")
    print("held-out (toy world held-out prompts)   ours (hand-written)   Trainer")
    for key in ("token_risk_acc", "token_category_acc", "query_risk_acc", "query_category_acc"):
        print(f"  {key:<38} {a[key]:.4f}                {b[key]:.4f}")
    print(f"  {'response_tokens':<38} {a['response_tokens']:.0f}                 {b['response_tokens']:.0f}")
    if b["token_risk_acc"] < a["token_risk_acc"] - args.tolerance:
        print(f"FAIL: the Trainer's held-out token risk accuracy is more than {args.tolerance} below ours")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
