"""Where the toy-guard SFT step's gap between the hand-written loop and trl.SFTTrainer goes (the 4x of
`guard_sft_vs_trl.py`): one batch, forward + backward, taking ours apart one saving at a time.

One batch of 32 Gen-format rows that share their first 24 prompt tokens (a batch of ours: `share_prefix`
buckets rows so), from the same weights, timed as the median of --repeats forward + backward passes after one
warm-up, in this order:
  ours                         `_lm_loss` with the shared prefix run once, LM head on the target positions only
  ours, no shared prefix       the same rows each run whole (`share_prefix=False`)
  ours, LM head everywhere     and the LM head over every position, cross-entropy on the targets
  TRL                          `SFTTrainer.compute_loss` on TRL's collated batch (its fused chunked LM head)
  TRL padding_free             the same with `padding_free=True` (one packed row, position ids, no padding)
Each ratio is against the line above it. Check: every variant's loss on the batch agrees with ours within
LOSS_ATOL (the same mean cross-entropy over the verdict tokens), else exit 1.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

from guard_sft_vs_trl import guard_rows
from record import recorded

LOSS_ATOL = 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="results Markdown file")
    args = parser.parse_args()
    from saferl.runtime import configure_process

    configure_process()
    with recorded(args.out):
        return run(args)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from saferl.config import ToyWorldConfig
    from saferl.references import resolve_reference
    from saferl.sft import _collate_lm, _lm_loss, chat_example
    from saferl.sft_trl import sft_config, tokenized_dataset
    from saferl.toyworld.build import new_model

    tok = AutoTokenizer.from_pretrained(resolve_reference("toyworld:guard"))
    rows = guard_rows(512)
    examples = [chat_example(tok, m, c) for m, c in rows]
    init = new_model(ToyWorldConfig().guard, tok, head="lm", seed=0)
    batch_rows = [e for e in examples if e.prompt_ids[:24] == examples[0].prompt_ids[:24]][: args.rows]
    shared = _collate_lm(batch_rows, tok.pad_token_id, share_prefix=True)
    print(f"{len(batch_rows)} rows, padded width {shared['input_ids'].shape[1]}, shared prefix "
          f"{int(shared['shared_prefix'])} tokens, {sum(len(e.target_ids) for e in batch_rows)} target tokens")

    def timed(step) -> tuple[float, float]:
        loss = step()
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), loss

    model = copy.deepcopy(init).train()

    def ours(share: bool):
        batch = _collate_lm(batch_rows, tok.pad_token_id, share_prefix=share)

        def step() -> float:
            model.zero_grad()
            loss = _lm_loss(model, batch)
            loss.backward()
            return loss.item()
        return step

    def ours_head_everywhere():
        batch = _collate_lm(batch_rows, tok.pad_token_id)

        def step() -> float:
            model.zero_grad()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
            loss.backward()
            return loss.item()
        return step

    results = {"ours": timed(ours(True)), "ours, no shared prefix": timed(ours(False)),
               "ours, LM head everywhere": timed(ours_head_everywhere())}
    with tempfile.TemporaryDirectory() as out:
        for name, extra in (("TRL", []), ("TRL padding_free", ["padding_free=true"])):
            config = sft_config(out, steps=1, batch_size=len(batch_rows), lr=3e-3, seed=0, deepspeed=None,
                                overrides=["gradient_checkpointing=false", "save_strategy=no", "report_to=none",
                                           *extra])
            if config.padding_free:
                config.max_length = None  # TRL requires it without packing; these rows are far shorter anyway
            trainer = SFTTrainer(model=copy.deepcopy(init), args=config, train_dataset=tokenized_dataset(tok, rows),
                                 processing_class=tok)
            trainer.model.train()
            batch = trainer.data_collator([{"input_ids": e.prompt_ids + e.target_ids,
                                            "labels": [-100] * len(e.prompt_ids) + e.target_ids} for e in batch_rows])

            def step(trainer=trainer, batch=batch) -> float:
                trainer.model.zero_grad()
                loss = trainer.compute_loss(trainer.model, dict(batch))
                loss.backward()
                return loss.item()
            results[name] = timed(step)
    previous, want, failed = None, results["ours"][1], False
    for name, (seconds, loss) in results.items():
        ratio = f"{seconds / previous:.2f}x the line above" if previous else ""
        print(f"  {name:<26} {seconds * 1000:8.1f} ms  loss {loss:.6f}  {ratio}")
        previous = seconds
        failed |= abs(loss - want) > LOSS_ATOL
    print(f"TRL / ours on this batch: {results['TRL'][0] / results['ours'][0]:.2f}x")
    if failed:
        print(f"FAIL: a variant's loss differs from ours by more than {LOSS_ATOL}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
