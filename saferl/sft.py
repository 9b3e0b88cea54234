"""Supervised fine-tuning: chat SFT with the loss on the completion only, and reward-model regression.

This is how the toy world builds its policy, its Gen-format guard and its helpfulness RM, and what
`saferl sft --trainer saferl` runs on a user's JSONL (`{"messages": [...], "completion": "Safety: ...\\n..."}`);
plain `saferl sft` runs the same data through trl.SFTTrainer (`saferl.sft_trl`), which reuses `chat_example`.
Prompts are rendered by the tokenizer's own chat template, so a guard template (which always appends its
generation prefix) and a policy template are handled alike.

Shortcuts: one process, one torch thread on CPU, AdamW with linear warm-up then cosine decay, right padding.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class SFTExample:
    """Prompt tokens (no loss) followed by target tokens (loss). Targets end with EOS."""

    prompt_ids: list[int]
    target_ids: list[int]


@dataclass(frozen=True)
class RegressionExample:
    """A whole sequence and the scalar a sequence-classification head should predict for it. `group` ties the
    answers to one prompt together for the pairwise term of `train_regression` (-1: none)."""

    input_ids: list[int]
    target: float
    group: int = -1


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], **template_kwargs: Any) -> list[int]:
    """Token ids of the chat-template rendering of `messages` with the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_example(tokenizer: Any, messages: list[dict[str, str]], completion: str,
                 **template_kwargs: Any) -> SFTExample:
    """Encode one SFT example: the prompt by the chat template, the completion plus EOS as target."""
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return SFTExample(render_prompt_ids(tokenizer, messages, **template_kwargs), target)


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _collate_lm(batch: Sequence[SFTExample], pad_id: int, share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask [B, T], labels [B, T] (-100 outside the targets) and, with
    `share_prefix`, the length of the prompt prefix common to all rows (at least one prompt token is left
    outside it: the last prompt position predicts the first target)."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        seq = e.prompt_ids + e.target_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.target_ids)
        mask[i, : len(seq)] = 1
    shared = _common_prefix([e.prompt_ids for e in batch]) - 1 if share_prefix and len(batch) > 1 else 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "shared_prefix": torch.tensor(max(0, shared))}


def _collate_regression(batch: Sequence[RegressionExample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "targets": torch.tensor([e.target for e in batch], dtype=torch.float32),
            "groups": torch.tensor([e.group for e in batch], dtype=torch.long)}


def target_hidden(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's last hidden state at each position that predicts a target token: `(hidden [N, H], labels
    [N], where [B, T - 1])`, `where` marking those N positions among a row's first T - 1 (the next-token
    layout). The LM head is left to the caller, to run only there: a guard's long moderation instruction carries
    no loss, and the head over every position was ~25% of the step.

    With `shared_prefix` P in the batch (all rows start with the same P tokens, e.g. the guard instruction),
    those P positions are run once with batch size 1 and their KV cache is repeated for every row; the
    gradient from all rows flows back into the one prefix pass. Same result, ~3x less work for guard SFT.
    """
    decoder = model.get_decoder()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    shared = int(batch.get("shared_prefix", torch.tensor(0)))
    if shared > 0:
        from transformers import DynamicCache

        cache = DynamicCache()
        decoder(input_ids=ids[:1, :shared], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(ids.shape[0])
        positions = torch.arange(shared, ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        hidden = decoder(input_ids=ids[:, shared:], attention_mask=mask, past_key_values=cache,
                         position_ids=positions, use_cache=True).last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    where = labels[:, 1:] != -100  # no target sits inside the shared prefix (`_collate_lm` leaves one out)
    suffix = where[:, shared:]
    return hidden[:, :-1][suffix], labels[:, 1:][where], where


def _lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token cross-entropy on targets, the LM head at target positions only (`target_hidden`)."""
    hidden, labels, _ = target_hidden(model, batch)
    logits = model.get_output_embeddings()(hidden)
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def _regression_loss(model: Any, batch: dict[str, torch.Tensor], pair_weight: float = 0.0) -> torch.Tensor:
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    loss = torch.nn.functional.mse_loss(scores, batch["targets"])
    if pair_weight:
        loss = loss + pair_weight * pairwise_loss(scores, batch["targets"], batch["groups"])
    return loss


def pairwise_loss(scores: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor,
                  margin: float = 1.0) -> torch.Tensor:
    """Mean of softplus(margin - (s_i - s_j)) over the pairs (i, j) of one group with target_i > target_j
    (Bradley-Terry with a margin); 0 when the batch has no such pair. Shapes: all [B]."""
    better = (targets[:, None] > targets[None, :]) & (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    if not bool(better.any()):
        return scores.sum() * 0.0
    return torch.nn.functional.softplus(margin - (scores[:, None] - scores[None, :])[better]).mean()


def _epoch_batches(examples: Sequence[Any], batch_size: int, rng: random.Random,
                   bucket: Callable[[Any], Any] | None) -> list[list[int]]:
    """One shuffled epoch of index batches; with `bucket`, every batch comes from a single bucket."""
    groups: dict[Any, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(bucket(e) if bucket else 0, []).append(i)
    batches = []
    for idx in groups.values():
        rng.shuffle(idx)
        batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_factor(step: int, *, warmup_steps: int, steps: int) -> float:
    """The lr multiplier at optimizer step `step` (0-based): linear warm-up from 1/`warmup_steps` (not from 0:
    the first step already moves the weights), 1 at step `warmup_steps` - 1, then cosine decay to 0.1 at the last
    step. Ending at a low lr leaves a sharp model, which matters when it is sampled at temperature 1 (a constant
    lr left ~20% of samples with a stray token)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(model: Any, *, lr: float, warmup_steps: int,
                        steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The loop's optimizer (AdamW, torch's betas and eps, no weight decay) and its `lr_factor` schedule, stepped
    once per optimizer step; `saferl.sft_batched` hands the same pair to TRL's and transformers' trainers."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup_steps=warmup_steps, steps=steps))


def _fit(model: Any, examples: Sequence[Any], collate: Callable, loss_fn: Callable, *, pad_id: int,
         steps: int, batch_size: int, lr: float, warmup_steps: int, seed: int, label: str,
         log_every: int, bucket: Callable[[Any], Any] | None = None) -> list[float]:
    """The shared loop: shuffled epochs of minibatches, AdamW, warm-up, gradient clipping at 1."""
    if not examples:
        raise ValueError(f"{label}: no training examples")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt, sched = adamw_with_schedule(model, lr=lr, warmup_steps=warmup_steps, steps=steps)
    batches: list[list[int]] = []
    losses: list[float] = []
    start = time.monotonic()
    for step in range(steps):
        if not batches:
            batches = _epoch_batches(examples, batch_size, rng, bucket)
        batch = collate([examples[i] for i in batches.pop()], pad_id)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            print(f"  [{label}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({time.monotonic() - start:.0f}s)", flush=True)
    model.eval()
    if not math.isfinite(losses[-1]):
        raise RuntimeError(f"{label}: loss diverged ({losses[-1]})")
    return losses


def train_causal_lm(model: Any, examples: Sequence[SFTExample], *, pad_id: int, steps: int, batch_size: int,
                    lr: float, warmup_steps: int = 20, seed: int = 0, label: str = "sft",
                    log_every: int = 50, share_prefix: bool = False) -> list[float]:
    """Fine-tune a causal LM on `examples` (loss on targets only). Returns the loss per step.

    `share_prefix` (for guards, whose prompts open with one long instruction): batches are drawn from
    examples with the same first 24 prompt tokens, and their common prefix is computed once per batch.
    """
    def collate(batch: Sequence[SFTExample], pad: int) -> dict[str, torch.Tensor]:
        return _collate_lm(batch, pad, share_prefix)

    bucket = (lambda e: tuple(e.prompt_ids[:24])) if share_prefix else None
    return _fit(model, examples, collate, _lm_loss, pad_id=pad_id, steps=steps, batch_size=batch_size,
                lr=lr, warmup_steps=warmup_steps, seed=seed, label=label, log_every=log_every, bucket=bucket)


def train_regression(model: Any, examples: Sequence[RegressionExample], *, pad_id: int, steps: int,
                     batch_size: int, lr: float, warmup_steps: int = 20, seed: int = 0, label: str = "rm",
                     log_every: int = 50, pair_weight: float = 0.0, group_size: int = 8) -> list[float]:
    """Fit a one-label sequence-classification model to scalar targets (MSE). Returns the loss per step.

    With `pair_weight` > 0 each batch holds whole groups (`RegressionExample.group`: the answers to one prompt;
    batch_size // group_size groups), and the loss adds `pairwise_loss` over the pairs of a group. A clean
    answer and its near miss differ by one word; only such a pair in one batch teaches the difference (MSE over
    mixed batches ranked a clean answer above its misspellings 72-85% of the time, toy world build 5 trials).
    """
    def loss(m: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _regression_loss(m, batch, pair_weight)

    per_batch = max(1, batch_size // group_size)
    bucket = (lambda e: e.group // per_batch) if pair_weight else None  # a bucket is one batch of groups
    return _fit(model, examples, _collate_regression, loss, pad_id=pad_id, steps=steps,
                batch_size=batch_size if not pair_weight else len(examples), lr=lr,
                warmup_steps=warmup_steps, seed=seed, label=label, log_every=log_every, bucket=bucket)


def load_chat_jsonl(path: str | Path) -> list[tuple[list[dict[str, str]], str]]:
    """Rows `{"messages": [...], "completion": str}`; errors name the file and line."""
    from saferl.data import check_messages, read_jsonl

    rows = []
    for where, row in read_jsonl(path):
        if not isinstance(row, dict) or "messages" not in row or "completion" not in row:
            raise ValueError(f"{where}: expected an object with 'messages' and 'completion'")
        messages = check_messages(row["messages"], where, "messages")
        if not messages[-1]["content"].strip():
            raise ValueError(f"{where}: the prompt is empty (the last message of 'messages')")
        if not isinstance(row["completion"], str) or not row["completion"].strip():  # nothing to learn
            raise ValueError(f"{where}: 'completion' must be a non-empty string, got {row['completion']!r}")
        rows.append((row["messages"], row["completion"]))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows
