"""Guard SFT: the hand-written loop (`saferl sft --trainer saferl`) against trl.SFTTrainer (`saferl sft`).

The same work on both sides: the toy world's guard shape from the same random init, the same Gen-format rows
(prompt and response moderation of toy-world training prompts, tokenized once by `saferl.sft.chat_example`),
the same steps of the same batch size, AdamW at the same peak lr, linear warm-up, gradient clipping at 1,
float32, loss on the verdict tokens only. Ours batches rows that share their first 24 prompt tokens and runs
their common prefix (the guard's long instruction) once per batch (`share_prefix`, as the toy world builds the
guard); TRL pads each batch of rows in its own order and runs every position. TRL runs without gradient
checkpointing (its default is on, which would add a recomputed forward to its side only). Timed from the first
step to the last (TRL: its `on_train_begin` / `on_train_end` callbacks; dataset preparation and model set-up
are outside), rounds interleaved (ours, TRL, ours, TRL) so drift in the machine's load hits both.

Check: on one batch of 8 response-mode rows, TRL's `compute_loss` and ours (`_lm_loss` with the shared prefix)
must agree within LOSS_ATOL from the same weights, else exit 1. Both final losses are printed (mean of the last
5 steps; the batch orders differ, so only their size is comparable).

`--trl-options "KEY=VALUE ..."` (repeatable) adds a TRL variant with those SFTConfig fields on top of the
baseline's, run in the same rounds (each variant's loss is checked too), to see whether TRL's own documented
options (padding_free, group_by_length, dataloader settings, ...) close the gap. A padding-free variant without
packing runs with max_length None, as TRL requires (the rows are shorter than its 1024 anyway: nothing is cut).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

from record import recorded

LOSS_ATOL = 1e-4


def guard_rows(n: int) -> list[tuple[list[dict[str, str]], str]]:
    """`n` Gen-format rows: every prompt of a spread of toy-world training prompts, once in prompt mode and
    once per response style in response mode."""
    from saferl.guard.templates import format_verdict, moderation_messages
    from saferl.toyworld import world

    rows = []
    for p in world.make_prompts("train")[::7]:
        label, cats = world.prompt_verdict(p)
        rows.append((moderation_messages(p.messages, None), format_verdict(label, cats, None)))
        for style, texts in world.responses_for(p).items():
            v = world.response_verdict(p, style)
            rows.append((moderation_messages(p.messages, texts[0]), format_verdict(v.safety, v.categories,
                                                                                    v.refusal)))
    return rows[:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trl-options", action="append", default=[], metavar='"KEY=VALUE ..."',
                        help="an extra TRL variant: SFTConfig fields on top of the baseline's (repeatable)")
    parser.add_argument("--out", default=None, help="results Markdown file")
    args = parser.parse_args()
    from saferl.runtime import configure_process

    configure_process()
    with recorded(args.out):
        return run(args)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from saferl.config import ToyWorldConfig
    from saferl.references import resolve_reference
    from saferl.sft import _collate_lm, _lm_loss, chat_example, train_causal_lm
    from saferl.sft_trl import sft_config, tokenized_dataset
    from saferl.toyworld.build import new_model

    tok = AutoTokenizer.from_pretrained(resolve_reference("toyworld:guard"))
    rows = guard_rows(args.rows)
    examples = [chat_example(tok, m, c) for m, c in rows]
    dataset = tokenized_dataset(tok, rows)
    init = new_model(ToyWorldConfig().guard, tok, head="lm", seed=0)
    tokens = sum(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    print(f"{len(rows)} rows, {tokens / len(rows):.0f} tokens a row; {args.steps} steps of {args.batch_size}, "
          f"{args.rounds} rounds; guard {sum(p.numel() for p in init.parameters()) / 1e6:.2f}M parameters")

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.monotonic()

        def on_train_end(self, *a, **k):
            self.seconds = time.monotonic() - self.start

    variants = {"TRL": []} | {f"TRL {options}": options.split() for options in args.trl_options}

    def trl_trainer(out: str, extra: list[str]) -> tuple[SFTTrainer, Clock]:
        config = sft_config(out, steps=args.steps, batch_size=args.batch_size, lr=3e-3, seed=0, deepspeed=None,
                            overrides=["gradient_checkpointing=false", "warmup_steps=20", "save_strategy=no",
                                       "logging_steps=1", "disable_tqdm=true", "lr_scheduler_type=cosine", *extra])
        if config.padding_free and not config.packing:
            config.max_length = None
        clock = Clock()
        return SFTTrainer(model=copy.deepcopy(init), args=config, train_dataset=dataset, processing_class=tok,
                          callbacks=[clock]), clock

    with tempfile.TemporaryDirectory() as out:
        response = [e for e, (m, _) in zip(examples, rows) if m[-1]["role"] == "assistant"][:8]
        ours = _lm_loss(init, _collate_lm(response, tok.pad_token_id, share_prefix=True)).item()
        for name, extra in variants.items():
            trainer, _ = trl_trainer(out, extra)
            batch = trainer.data_collator([{"input_ids": e.prompt_ids + e.target_ids,  # as TRL's prepared rows
                                            "labels": [-100] * len(e.prompt_ids) + e.target_ids} for e in response])
            with torch.no_grad():
                theirs = trainer.compute_loss(trainer.model, batch).item()
            print(f"check: loss on one batch of 8 response rows, ours {ours:.6f}, {name} {theirs:.6f}, "
                  f"|diff| {abs(ours - theirs):.1e} (<= {LOSS_ATOL})")
            if abs(ours - theirs) > LOSS_ATOL:
                print(f"FAIL: the two losses differ ({name})")
                return 1
        times: dict[str, list[float]] = {"ours": [], **{name: [] for name in variants}}
        final: dict[str, float] = {}
        for r in range(args.rounds):
            model = copy.deepcopy(init)
            start = time.monotonic()
            losses = train_causal_lm(model, examples, pad_id=tok.pad_token_id, steps=args.steps,
                                     batch_size=args.batch_size, lr=3e-3, warmup_steps=20, seed=r,
                                     log_every=0, share_prefix=True)
            times["ours"].append(time.monotonic() - start)
            final["ours"] = sum(losses[-5:]) / 5
            for name, extra in variants.items():
                trainer, clock = trl_trainer(out, extra)
                trainer.train()
                times[name].append(clock.seconds)
                logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
                final[name] = sum(logged[-5:]) / 5
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    step = {k: statistics.median(v) / args.steps for k, v in times.items()}
    print(f"seconds a step (median of rounds): ours {step['ours']:.3f}")
    for name in variants:
        print(f"  {name}: {step[name]:.3f}; {name} / ours {step[name] / step['ours']:.2f}x")
    print("final loss (mean of the last 5 steps): " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
