"""SafeRL's batches and losses inside TRL's and transformers' trainers: what the toy world's build trains with
under `saferl toyworld build --trainer trl` (benchmarks/toyworld_build_trl.py measures it against the
hand-written loop).

Owns three small pieces that measurably beat what the trainers do by themselves (one toy guard batch,
benchmarks/results/guard_sft_breakdown.md: TRL 2.93x ours), and nothing else of the training:
- **Batches made by SafeRL.** `batched_rows` draws the index batches of `sft._epoch_batches` (a guard's batch
  from examples sharing their first 24 prompt tokens; an RM's batch of whole answer groups) for every step,
  in order, and hands the trainer one batch per dataset row (`per_device_train_batch_size=1`,
  `train_sampling_strategy=sequential`; the collators unwrap the row). The trainer's own sampler cannot draw a
  batch from one bucket.
- **A shared-prefix, target-only LM head on TRL's own seam.** `trl.SFTTrainer` scores a batch through
  `model(**batch, fused_lm_head=True)`, the forward `trl.trainer.utils.add_fused_lm_head` installs, whose
  `FusedCausalLMOutput` (per-token log-probs, entropy, top-1, label mask) its `compute_loss` reads.
  `install_target_head` puts SafeRL's forward there instead (after the trainer is built): the batch's common
  prompt prefix run once (`sft.target_hidden`), the LM head only at target positions (TRL's head scores every
  position off Triton: its `compact = _use_triton`). The loss, metrics, checkpoints and logging stay TRL's
  (the optimizer and schedule: below).
- **Score regression through `transformers.Trainer`.** `train_regression_hf` fits a one-label classifier to
  scalar targets (MSE plus `sft.pairwise_loss` within a prompt's answers, `sft._regression_loss`) as the
  Trainer's `compute_loss_func`: `trl.RewardTrainer`'s loss is Bradley-Terry over chosen/rejected pairs only.
The recipe is `sft._fit`'s, exactly: its optimizer and schedule objects (`sft.adamw_with_schedule`: AdamW
without weight decay, linear warm-up from lr/warm-up, cosine decay to 10% of lr) passed as the trainers'
`optimizers` (built over the model's own parameters: no LoRA or DeepSpeed here; `saferl sft` has those),
clipping at 1 (`hf_recipe`). Not the Trainer's own `cosine_with_min_lr` schedule: its warm-up starts
at lr 0, so its first step only fills AdamW's moments and every warm-up step runs one step behind, which alone
took the toy helpfulness RM's helpful-over-refusal ranking from 0.609 to 0.488; with these objects the Trainer's
RM is the hand-written loop's bit for bit (benchmarks/results/toyworld_rm_trl.md).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from saferl.sft import (
    RegressionExample,
    SFTExample,
    _collate_lm,
    _collate_regression,
    _epoch_batches,
    adamw_with_schedule,
)


def batched_rows(examples: Sequence[Any], *, steps: int, batch_size: int, seed: int,
                 bucket: Callable[[Any], Any] | None) -> list[list[Any]]:
    """`steps` batches of `examples`, each a list: shuffled epochs as the hand-written loop draws them (the same
    `random.Random(seed)`, so the same batches in the same order), every batch from one `bucket`."""
    rng, out = random.Random(seed), []
    while len(out) < steps:
        out += [[examples[i] for i in idx] for idx in reversed(_epoch_batches(examples, batch_size, rng, bucket))]
    return out[:steps]


def prefix_bucket(example: SFTExample) -> tuple[int, ...]:
    """Examples whose first 24 prompt tokens agree share a batch (a guard: the same moderation instruction)."""
    return tuple(example.prompt_ids[:24])


def lm_dataset(batches: Sequence[Sequence[SFTExample]]) -> Any:
    """A `datasets.Dataset` with one batch a row (`prompt_ids`, `target_ids`: a list per example), as
    `trl.SFTTrainer` takes it."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt_ids": [[e.prompt_ids for e in b] for b in batches],
                              "target_ids": [[e.target_ids for e in b] for b in batches]})


def lm_collator(pad_id: int, share_prefix: bool) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """The data collator of an `lm_dataset`: one row, one batch (`sft._collate_lm`)."""
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        (row,) = rows
        batch = [SFTExample(p, t) for p, t in zip(row["prompt_ids"], row["target_ids"], strict=True)]
        return _collate_lm(batch, pad_id, share_prefix)

    return collate


def target_head_forward(model: Any, original: Callable[..., Any]) -> Callable[..., Any]:
    """A forward for `model` that, called with `fused_lm_head=True`, returns TRL's `FusedCausalLMOutput` from
    `sft.target_hidden` (see the module docstring) and otherwise is `original`."""
    from trl.trainer.utils import FusedCausalLMOutput

    from saferl.sft import target_hidden

    def forward(*args: Any, fused_lm_head: bool = False, labels: torch.Tensor | None = None,
                shared_prefix: torch.Tensor | None = None, num_items_in_batch: Any = None,
                **kwargs: Any) -> Any:
        if not fused_lm_head:
            return original(*args, labels=labels, **kwargs)
        batch = {"input_ids": kwargs["input_ids"], "attention_mask": kwargs["attention_mask"], "labels": labels,
                 "shared_prefix": torch.tensor(0) if shared_prefix is None else shared_prefix}
        hidden, targets, where = target_hidden(model, batch)
        logprobs = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
        picked = logprobs.gather(1, targets[:, None])[:, 0]
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)
            top1 = (logprobs.argmax(-1) == targets).to(logprobs.dtype)
        def spread(x: torch.Tensor) -> torch.Tensor:  # [N] -> [B, T - 1], zero where no target
            return x.new_zeros(where.shape).masked_scatter(where, x)

        count = where.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-picked.sum() / count, log_probs=spread(picked), entropy=spread(entropy),
                                   is_top1=spread(top1), label_mask=where)

    return forward


def install_target_head(trainer: Any) -> None:
    """Replace the fused LM head `trl.SFTTrainer` installed on its model (the base model under peft) with
    `target_head_forward`. Call it after the trainer is built and before `train()`."""
    from accelerate.utils import is_peft_model

    model = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    model.forward = target_head_forward(model, type(model).forward.__get__(model))


def hf_recipe(*, log_every: int) -> list[str]:
    """The rest of `sft._fit`'s recipe as TrainingArguments argv (for `sft_trl.training_args`), over
    `batched_rows`; the optimizer and schedule are `sft.adamw_with_schedule`'s, passed as `optimizers`."""
    return ["--max_grad_norm", "1", "--train_sampling_strategy", "sequential", "--remove_unused_columns", "false",
            "--logging_steps", str(log_every), "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0",
            "--gradient_checkpointing", "false"]  # TRL's default; it drops the shared prefix's KV cache


def train_causal_lm_trl(model: Any, tokenizer: Any, examples: Sequence[SFTExample], *, steps: int,
                        batch_size: int, lr: float, warmup_steps: int, seed: int, share_prefix: bool,
                        log_every: int = 50) -> list[float]:
    """`sft.train_causal_lm` through `trl.SFTTrainer`: the same batches (`batched_rows`), SafeRL's head
    (`install_target_head`). Trains `model` in place; returns the logged losses."""
    from trl import SFTConfig, SFTTrainer

    from saferl.sft_trl import training_args

    with tempfile.TemporaryDirectory(prefix="saferl-sft-") as out:
        config = training_args(SFTConfig, out, steps=steps, batch_size=1, lr=lr, seed=seed, deepspeed=None,
                               overrides=(), ours=hf_recipe(log_every=log_every)
                               + ["--dataset_kwargs", '{"skip_prepare_dataset": true}'])
        rows = batched_rows(examples, steps=steps, batch_size=batch_size, seed=seed,
                            bucket=prefix_bucket if share_prefix else None)
        trainer = SFTTrainer(model=model, args=config, train_dataset=lm_dataset(rows), processing_class=tokenizer,
                             data_collator=lm_collator(tokenizer.pad_token_id, share_prefix),
                             optimizers=adamw_with_schedule(model, lr=lr, warmup_steps=warmup_steps, steps=steps))
        install_target_head(trainer)
        trainer.train()
    model.eval()
    return _logged_losses(trainer, "sft")


def regression_loss_func(pair_weight: float) -> Callable[..., torch.Tensor]:
    """`sft._regression_loss` as the Trainer's `compute_loss_func` (labels: the `targets`/`groups` mapping)."""
    from saferl.sft import pairwise_loss

    def loss(outputs: Any, labels: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
        scores = outputs.logits[:, 0]
        value = torch.nn.functional.mse_loss(scores, labels["targets"])
        if pair_weight:
            value = value + pair_weight * pairwise_loss(scores, labels["targets"], labels["groups"])
        return value

    return loss


def regression_collator(pad_id: int) -> Callable[[list[list[RegressionExample]]], dict[str, Any]]:
    def collate(rows: list[list[RegressionExample]]) -> dict[str, Any]:
        (batch,) = rows
        b = _collate_regression(batch, pad_id)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                "labels": {"targets": b["targets"], "groups": b["groups"]}}

    return collate


def train_regression_hf(model: Any, examples: Sequence[RegressionExample], *, pad_id: int, steps: int,
                        batch_size: int, lr: float, warmup_steps: int, seed: int, pair_weight: float,
                        group_size: int, log_every: int = 50) -> list[float]:
    """`sft.train_regression` through `transformers.Trainer` (`compute_loss_func`; the same batches)."""
    from transformers import Trainer, TrainingArguments

    from saferl.sft_trl import training_args

    per_batch = max(1, batch_size // group_size)
    bucket = (lambda e: e.group // per_batch) if pair_weight else None
    rows = batched_rows(examples, steps=steps, batch_size=len(examples) if pair_weight else batch_size,
                        seed=seed, bucket=bucket)
    with tempfile.TemporaryDirectory(prefix="saferl-rm-") as out:
        config = training_args(TrainingArguments, out, steps=steps, batch_size=1, lr=lr, seed=seed,
                               deepspeed=None, overrides=(),
                               ours=hf_recipe(log_every=log_every))
        trainer = Trainer(model=model, args=config, train_dataset=rows, data_collator=regression_collator(pad_id),
                          compute_loss_func=regression_loss_func(pair_weight),
                          optimizers=adamw_with_schedule(model, lr=lr, warmup_steps=warmup_steps, steps=steps))
        trainer.loss_is_scaled_for_ga = False  # a per-batch mean, as `sft._fit`'s
        trainer.train()
    model.eval()
    return _logged_losses(trainer, "rm")


def _logged_losses(trainer: Any, label: str) -> list[float]:
    import math

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses and not math.isfinite(losses[-1]):
        raise RuntimeError(f"{label}: loss diverged ({losses[-1]})")
    return losses
