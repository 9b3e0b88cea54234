"""Training Qwen3Guard-Stream heads on any Qwen3 backbone: initialisation, the paper's loss, the loop.

Owns `init_stream_guard` (a Stream model from a Qwen3 backbone checkpoint or from an existing Stream
checkpoint), `collate`, `stream_loss` (spec/qwen3guard.md §3.5), `train_stream_guard`,
`save_trained_stream_guard` (released layout plus a ChatML tokenizer) and `token_accuracy`. The examples and
training rows it trains on are `saferl.guard.stream_data`'s; the toy world's data source lives in
`saferl.toyworld.stream`.

Shortcuts and choices:
- The loss follows the paper (§4.3): response loss = sum over response tokens of risk CE, plus category CE
  where the gold risk is Unsafe or Controversial, divided by the number of response tokens in the batch
  (a token mean over the batch, not a mean of per-conversation means); query loss = risk CE plus category CE
  (risky prompts only) at the user's `<|im_end|>`, averaged over the rows that carry a query label; total =
  sum. A JSONL response row carries no query label; toy examples carry both.
- "Response tokens" are every position after the user's `<|im_end|>` (the assistant header and think
  scaffold included): the streaming reader (`saferl.guard.stream`) reads the response heads at all of them.
- Batches are right-padded with no attention mask: attention is causal, so padding after a row's last token
  never reaches its real positions (and padded positions carry no loss).
- Two loops run `stream_loss`. `train_stream_guard_hf` (what `saferl guard train-stream` runs) is HF
  `transformers.Trainer` with the loss passed as its `compute_loss_func` hook, no subclass: the collator hands
  the labels over as one `labels` mapping, which the Trainer pops before `model(input_ids=...)` and passes
  to the hook; so checkpoints, resume, `report_to` tracking, gradient accumulation, DeepSpeed and
  `accelerate launch` are the Trainer's. Its defaults (`stream_training_args`) copy the other loop's recipe.
  `train_stream_guard` is `saferl.sft`'s hand-written loop (AdamW, linear warm-up, cosine decay to 10%,
  clipping at 1), kept because the toy world's build calls it (`saferl.toyworld.stream`).
  `freeze_backbone=True` trains the heads only (no gradient flows into the backbone at all).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saferl.guard.conversation import CHATML_TEMPLATE
from saferl.guard.stream_data import IGNORE, StreamExample
from saferl.guard.stream_model import (
    GUARD_CONFIG_KEYS,
    GuardLogits,
    Qwen3StreamGuard,
    load_stream_guard,
    save_stream_guard,
    stream_guard_config,
)


def _init_heads(model: Qwen3StreamGuard, seed: int) -> None:
    """Real, seeded weights for every module outside the backbone (the two head paths)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in model.named_children():
            if name == "model":
                continue
            module.to_empty(device="cpu")
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=model.config.initializer_range)
            else:  # RMSNorm
                nn.init.ones_(module.weight)


def init_stream_guard(path: str | Path, *, guard_inner_size: int | None = None,
                      seed: int = 0) -> Qwen3StreamGuard:
    """A float32 Stream guard to train, from a Stream checkpoint or from a Qwen3 backbone.

    A directory whose config carries Stream keys loads as is (`load_stream_guard`). Any other Qwen3
    checkpoint (Qwen3ForCausalLM or a sequence classifier: its `model.*` weights; a bare Qwen3Model: all its
    weights) becomes the backbone, and the heads start from seeded random weights with the official label
    maps (spec §3.2).

    Args:
        path: checkpoint directory (config.json + safetensors).
        guard_inner_size: G for new heads (default hidden_size // 2, as the 0.6B guard's 512 for 1024).
        seed: seed of the new heads.
    """
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from saferl.guard.stream_model import _read_state_dict

    directory = Path(path)
    raw = json.loads((directory / "config.json").read_text())
    if any(k in raw for k in GUARD_CONFIG_KEYS):
        if guard_inner_size not in (None, raw.get("guard_inner_size")):
            raise ValueError(f"{directory} is a Stream guard with guard_inner_size "
                             f"{raw.get('guard_inner_size')}, not {guard_inner_size}")
        return load_stream_guard(directory).train()
    config = Qwen3Config.from_pretrained(directory)
    inner = guard_inner_size or config.hidden_size // 2
    keys = stream_guard_config(vocab_size=config.vocab_size, guard_inner_size=inner)
    for key in GUARD_CONFIG_KEYS:
        setattr(config, key, getattr(keys, key))
    with torch.device("meta"):
        model = Qwen3StreamGuard(config)
    state = _read_state_dict(directory)
    if any(k.startswith("model.") for k in state):  # a causal LM or classifier: its backbone
        backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    else:  # a bare Qwen3Model
        backbone = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = set(model.model.state_dict())
    missing, unexpected = sorted(expected - set(backbone)), sorted(set(backbone) - expected)
    if missing or unexpected:
        raise ValueError(f"{directory}: not a Qwen3 backbone of this config: missing keys {missing}; "
                         f"unexpected keys {unexpected}")
    model.model.load_state_dict({k: v.float() for k, v in backbone.items()}, strict=True, assign=True)
    _init_heads(model, seed)
    model.model.rotary_emb = Qwen3RotaryEmbedding(config)  # non-persistent buffers: never in a checkpoint
    return model.float().train()


def save_trained_stream_guard(model: Qwen3StreamGuard, tokenizer: Any, path: str | Path) -> Path:
    """Save `model` in the released layout and `tokenizer` with Qwen3 ChatML as its chat template (the Stream
    guard reads plain conversations: a Gen guard's moderation template would be wrong here)."""
    directory = Path(path)
    save_stream_guard(model, directory)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- loss and loop


def collate(batch: Sequence[StreamExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `risk`, `category` [B, T]; `query_index`, `query_risk`, `query_category`
    [B]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    risk = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    category = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        risk[i, : len(e.risk)] = torch.tensor(e.risk)
        category[i, : len(e.category)] = torch.tensor(e.category)
    return {"input_ids": ids, "risk": risk, "category": category,
            "query_index": torch.tensor([e.query_index for e in batch]),
            "query_risk": torch.tensor([e.query_risk for e in batch]),
            "query_category": torch.tensor([e.query_category for e in batch])}


def stream_loss(logits: GuardLogits, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's Stream loss (see the module docstring) from head logits over a collated batch.

    Args:
        logits: the four heads' logits, [B, T, C] each.
        batch: `collate` output.

    Returns:
        `loss` (= `response` + `query`), `response` and `query`, scalar tensors (0 when no row has labels of
        that kind).
    """
    risk, category = batch["risk"], batch["category"]
    n = (risk != IGNORE).sum().clamp(min=1)
    response = (F.cross_entropy(logits.risk_level.flatten(0, 1).float(), risk.flatten(), ignore_index=IGNORE,
                                reduction="sum")
                + F.cross_entropy(logits.category.flatten(0, 1).float(), category.flatten(),
                                  ignore_index=IGNORE, reduction="sum")) / n
    rows = torch.arange(risk.shape[0], device=risk.device)
    q = batch["query_index"]
    m = (batch["query_risk"] != IGNORE).sum().clamp(min=1)
    query = (F.cross_entropy(logits.query_risk_level[rows, q].float(), batch["query_risk"],
                             ignore_index=IGNORE, reduction="sum")
             + F.cross_entropy(logits.query_category[rows, q].float(), batch["query_category"],
                               ignore_index=IGNORE, reduction="sum")) / m
    return {"loss": response + query, "response": response, "query": query}


def _loss(model: Qwen3StreamGuard, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return stream_loss(model(batch["input_ids"]), batch)["loss"]


def train_stream_guard(model: Qwen3StreamGuard, examples: Sequence[StreamExample], *, pad_id: int, steps: int,
                       batch_size: int, lr: float, warmup_steps: int = 20, freeze_backbone: bool = False,
                       seed: int = 0, label: str = "stream", log_every: int = 50) -> list[float]:
    """Train the Stream heads (and the backbone unless `freeze_backbone`) on `examples` with `stream_loss`.

    Returns:
        The loss per step. The model is left in eval mode (and its backbone frozen, if asked).
    """
    from saferl.sft import _fit

    model.model.requires_grad_(not freeze_backbone)
    return _fit(model, examples, collate, _loss, pad_id=pad_id, steps=steps, batch_size=batch_size, lr=lr,
                warmup_steps=warmup_steps, seed=seed, label=label, log_every=log_every)


def trainer_collate(batch: Sequence[StreamExample], pad_id: int) -> dict[str, Any]:
    """`collate` in the layout `transformers.Trainer` passes on: `input_ids` [B, T] for the model, and the
    five label tensors as one `labels` mapping, popped by the Trainer and given to `trainer_loss`."""
    labels = collate(batch, pad_id)
    return {"input_ids": labels.pop("input_ids"), "labels": labels}


def trainer_loss(outputs: GuardLogits, labels: dict[str, torch.Tensor],
                 num_items_in_batch: Any = None) -> torch.Tensor:
    """`stream_loss` as the Trainer's `compute_loss_func` (`num_items_in_batch` is None here: the Trainer
    counts items in a `labels` tensor, and ours is a mapping; `stream_loss` normalises per batch)."""
    return stream_loss(outputs, labels)["loss"]


def stream_training_args(output: str, *, steps: int, batch_size: int, lr: float, warmup_steps: int, seed: int,
                         overrides: Sequence[str] = ()) -> Any:
    """`transformers.TrainingArguments` for `train_stream_guard_hf`: `train_stream_guard`'s recipe (AdamW
    without weight decay, linear warm-up (the Trainer's, from lr 0), cosine decay to 10% of `lr`, clipping
    at 1; the first step's loss logged, then the mean loss of every 10), then `overrides` (KEY=VALUE, any
    TrainingArguments field: save_steps, resume_from_checkpoint, report_to, gradient_accumulation_steps,
    deepspeed, ...; an unknown key raises ValueError naming it)."""
    from transformers import TrainingArguments

    from saferl.sft_trl import training_args

    ours = ["--warmup_steps", str(warmup_steps), "--lr_scheduler_type", "cosine_with_min_lr",
            "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}', "--weight_decay", "0", "--max_grad_norm", "1",
            "--logging_steps", "10", "--logging_first_step", "true", "--remove_unused_columns", "false"]
    return training_args(TrainingArguments, output, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         deepspeed=None, overrides=overrides, ours=ours)


def train_stream_guard_hf(model: Qwen3StreamGuard, examples: Sequence[StreamExample], *, pad_id: int, args: Any,
                          freeze_backbone: bool = False) -> list[dict[str, float]]:
    """Train the Stream heads (and the backbone unless `freeze_backbone`) on `examples` with `stream_loss`
    through `transformers.Trainer` (`args`: `stream_training_args`); checkpoints go to `args.output_dir`,
    and `args.resume_from_checkpoint` continues from one.

    With gradient accumulation, a step's loss is the mean of its micro-batches' `stream_loss` (each a token
    mean over its own micro-batch), where one batch of the same rows would take one token mean.

    Returns:
        The Trainer's log entries with a `loss`, in order. The model is left in eval mode.
    """
    from transformers import Trainer

    model.model.requires_grad_(not freeze_backbone)
    trainer = Trainer(model=model, args=args, train_dataset=list(examples), compute_loss_func=trainer_loss,
                      data_collator=lambda batch: trainer_collate(batch, pad_id))
    trainer.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    model.eval()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    if log and not math.isfinite(log[-1]["loss"]):
        raise RuntimeError(f"train-stream: loss diverged ({log[-1]['loss']})")
    return log


@torch.inference_mode()
def token_accuracy(model: Qwen3StreamGuard, examples: Sequence[StreamExample], *, pad_id: int,
                   batch_size: int = 64) -> dict[str, float]:
    """Argmax accuracy against the examples' own labels: `token_risk_acc` over response tokens,
    `token_category_acc` over risky tokens, `query_risk_acc` and `query_category_acc` (risky prompts) at
    the user's `<|im_end|>`, and `response_tokens`, the count behind the first."""
    device = next(model.parameters()).device
    hits = dict.fromkeys(("risk", "category", "query_risk", "query_category"), 0)
    totals = dict.fromkeys(hits, 0)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        out = model(batch["input_ids"])
        rows = torch.arange(len(batch["query_index"]), device=device)
        pairs = {
            "risk": (out.risk_level.argmax(-1), batch["risk"]),
            "category": (out.category.argmax(-1), batch["category"]),
            "query_risk": (out.query_risk_level[rows, batch["query_index"]].argmax(-1), batch["query_risk"]),
            "query_category": (out.query_category[rows, batch["query_index"]].argmax(-1),
                               batch["query_category"]),
        }
        for name, (pred, gold) in pairs.items():
            where = gold != IGNORE
            hits[name] += int((pred[where] == gold[where]).sum())
            totals[name] += int(where.sum())
    names = {"risk": "token_risk_acc", "category": "token_category_acc", "query_risk": "query_risk_acc",
             "query_category": "query_category_acc"}
    return {**{names[k]: hits[k] / max(1, totals[k]) for k in hits}, "response_tokens": float(totals["risk"])}
