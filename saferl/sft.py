"""Supervised fine-tuning: chat SFT with the loss on the completion only, and reward-model regression.

This is how the toy world builds its policy, its Gen-format guard and its helpfulness RM, and it is a
feature in its own right: `saferl sft` trains a guard in the Qwen3Guard-Gen format on a user's JSONL
(`{"messages": [...], "completion": "Safety: ...\\nCategories: ..."}`). Prompts are rendered by the
tokenizer's own chat template, so a guard template (which always appends its generation prefix) and a
policy template are handled alike.

Shortcuts: one process, one torch thread on CPU, AdamW with linear warm-up then cosine decay, right padding.
"""

from __future__ import annotations

import json
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
    """A whole sequence and the scalar a sequence-classification head should predict for it."""

    input_ids: list[int]
    target: float


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], **template_kwargs: Any) -> list[int]:
    """Token ids of the chat-template rendering of `messages` with the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_example(tokenizer: Any, messages: list[dict[str, str]], completion: str,
                 **template_kwargs: Any) -> SFTExample:
    """Encode one SFT example: the prompt by the chat template, the completion plus EOS as target."""
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return SFTExample(render_prompt_ids(tokenizer, messages, **template_kwargs), target)


def _collate_lm(batch: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask [B, T] and labels [B, T] (-100 outside the targets)."""
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        seq = e.prompt_ids + e.target_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.target_ids)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _collate_regression(batch: Sequence[RegressionExample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "targets": torch.tensor([e.target for e in batch], dtype=torch.float32)}


def _lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token cross-entropy on targets. The LM head runs only where there is a target: a guard's long
    moderation instruction carries no loss, and the head over every position was ~25% of the step."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    where = labels != -100
    logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), labels[where])


def _regression_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    return torch.nn.functional.mse_loss(scores, batch["targets"])


def _fit(model: Any, examples: Sequence[Any], collate: Callable, loss_fn: Callable, *, pad_id: int,
         steps: int, batch_size: int, lr: float, warmup_steps: int, seed: int, label: str,
         log_every: int) -> list[float]:
    """The shared loop: shuffled epochs of minibatches, AdamW, warm-up, gradient clipping at 1."""
    if not examples:
        raise ValueError(f"{label}: no training examples")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Linear warm-up, then cosine decay to 10%: ending at a low lr leaves a sharp model, which matters
    # when it is sampled at temperature 1 (a constant lr left ~20% of samples with a stray token).
    def lr_factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order: list[int] = []
    losses: list[float] = []
    start = time.monotonic()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = collate([examples[i] for i in order[:batch_size]], pad_id)
        del order[:batch_size]
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
                    log_every: int = 50) -> list[float]:
    """Fine-tune a causal LM on `examples` (loss on targets only). Returns the loss per step."""
    return _fit(model, examples, _collate_lm, _lm_loss, pad_id=pad_id, steps=steps, batch_size=batch_size,
                lr=lr, warmup_steps=warmup_steps, seed=seed, label=label, log_every=log_every)


def train_regression(model: Any, examples: Sequence[RegressionExample], *, pad_id: int, steps: int,
                     batch_size: int, lr: float, warmup_steps: int = 20, seed: int = 0, label: str = "rm",
                     log_every: int = 50) -> list[float]:
    """Fit a one-label sequence-classification model to scalar targets (MSE). Returns the loss per step."""
    return _fit(model, examples, _collate_regression, _regression_loss, pad_id=pad_id, steps=steps,
                batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, seed=seed, label=label,
                log_every=log_every)


def load_chat_jsonl(path: str | Path) -> list[tuple[list[dict[str, str]], str]]:
    """Rows `{"messages": [...], "completion": str}`; errors name the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or "messages" not in row or "completion" not in row:
                raise ValueError(f"{path}:{lineno}: expected an object with 'messages' and 'completion'")
            rows.append((row["messages"], row["completion"]))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows
