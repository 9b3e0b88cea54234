"""How a rollout batch becomes tensors and is cut into minibatches, ranks and micro-batches (pure).

Owns three decisions that make data-parallel training give the same update as one process:
- Layout: prompts left-padded to width P, responses right-padded to width C, so the LM head only has to run on
  the last C + 1 positions (`logits_to_keep`) and every response starts in the same column. Position ids come
  from the attention mask, so padding does not shift RoPE positions.
- Assignment: one permutation of the global batch (the same on every rank), cut into `minibatches` optimizer
  steps; rank r takes every world_size-th sample of a minibatch; each rank runs the same number of
  micro-batches (a rank that runs short gets a dummy row with an empty response, which adds nothing).
- Normalisation: each micro-batch's loss (a mean over its own sequences or tokens) is rescaled by
  local_count / global_count * world_size, where the counts follow the aggregation. Gradients are summed over
  micro-batches and averaged over ranks, so the result is the loss of the whole minibatch, however it was cut.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from saferl.types import TrainBatch


@dataclasses.dataclass
class PaddedBatch:
    """Tensors for a list of (prompt + response) sequences.

    input_ids [B, P + C], attention_mask [B, P + C], position_ids [B, P + C], response_mask [B, C] (1.0 on
    response tokens), response_width C. Response token j of row b sits at column P + j.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    response_width: int


def pad_batch(batch: TrainBatch, rows: list[int], pad_id: int, empty: list[bool] | None = None) -> PaddedBatch:
    """Pad the chosen rows of a TrainBatch. `empty[i]` marks dummy rows whose response mask is all zero."""
    prompts = [batch.input_ids[i][: batch.prompt_lens[i]] for i in rows]
    responses = [batch.input_ids[i][batch.prompt_lens[i]:] for i in rows]
    width_p, width_c = max(map(len, prompts)), max(1, max(map(len, responses)))
    n = len(rows)
    ids = torch.full((n, width_p + width_c), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width_p + width_c), dtype=torch.long)
    mask = torch.zeros((n, width_c), dtype=torch.float32)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        ids[b, width_p - len(prompt): width_p] = torch.tensor(prompt)
        ids[b, width_p: width_p + len(response)] = torch.tensor(response, dtype=torch.long)
        attn[b, width_p - len(prompt): width_p + len(response)] = 1
        if not (empty and empty[b]):
            mask[b, : len(response)] = 1.0
    positions = (attn.cumsum(-1) - 1).clamp_min(0)
    return PaddedBatch(ids, attn, positions, mask, width_c)


def loss_count(mask: torch.Tensor, mode: str, aggregation: str) -> float:
    """The denominator the loss averages over: response tokens for token-mean, else non-empty sequences.

    Args:
        mask: [B, C] response mask.
    """
    if mode != "gspo" and aggregation == "token-mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())


@dataclasses.dataclass
class MicroBatch:
    rows: list[int]  # indices into the TrainBatch
    empty: list[bool]  # dummy rows (response mask zeroed)


def assign(n: int, minibatches: int, world_size: int, rank: int, micro_batch_size: int,
           generator: torch.Generator) -> list[tuple[list[int], list[MicroBatch]]]:
    """Cut a batch of n samples into optimizer steps, this rank's share and its micro-batches.

    Every rank must pass an identically seeded `generator` (it draws one permutation).

    Returns:
        One entry per optimizer step: (all rows of the minibatch, this rank's micro-batches). Every rank gets
        the same number of micro-batches per step; minibatches with no rows are left out.
    """
    if minibatches < 1 or micro_batch_size < 1:
        raise ValueError(f"minibatches and micro_batch_size must be >= 1, got {minibatches}, {micro_batch_size}")
    order = torch.randperm(n, generator=generator).tolist()
    steps = []
    for chunk in torch.tensor_split(torch.tensor(order, dtype=torch.long), minibatches):
        rows = chunk.tolist()
        if not rows:
            continue
        mine = rows[rank::world_size]
        n_micro = math.ceil(math.ceil(len(rows) / world_size) / micro_batch_size)
        micro = []
        for k in range(n_micro):
            part = mine[k * micro_batch_size: (k + 1) * micro_batch_size]
            # A rank that runs out still joins the collective: one dummy row that contributes nothing.
            micro.append(MicroBatch(part, [False] * len(part)) if part else MicroBatch([rows[0]], [True]))
        steps.append((rows, micro))
    return steps
