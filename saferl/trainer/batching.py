"""How a rollout batch becomes tensors and is cut into minibatches, ranks and micro-batches (pure).

Owns three decisions that make data-parallel training give the same update as one process:
- Layout: `pack_batch`, what the trainer runs: one row without padding, each prompt once with the responses
  that share it behind it, so a GRPO group's prompt is run once instead of G times, with the RoPE positions
  and attention (`packed_attention`) each response has alone; only the positions that predict a response
  token are scored. The
  plain layout, `pad_batch`: prompts left-padded to width P, responses right-padded to width C (every response
  starts in the same column); position ids come from the attention mask, so padding does not shift RoPE
  positions.
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

from saferl.trainer.packed_attention import PackedAttention, packed_segments
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
           generator: torch.Generator, prompts: list[tuple[int, ...]] | None = None
           ) -> list[tuple[list[int], list[MicroBatch]]]:
    """Cut a batch of n samples into optimizer steps, this rank's share and its micro-batches.

    Every rank must pass an identically seeded `generator` (it draws one permutation). With `prompts` (each
    sample's prompt ids), a rank's share of a step is ordered by prompt (first appearance) before it is cut, so
    samples of one prompt fall into the same micro-batch and `pack_batch` runs their prompt once; which step and
    rank a sample goes to does not change.

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
        if prompts is not None:
            first: dict[tuple[int, ...], int] = {}
            for k, row in enumerate(mine):
                first.setdefault(prompts[row], k)
            mine.sort(key=lambda row: first[prompts[row]])  # stable: the permutation's order within a prompt
        n_micro = math.ceil(math.ceil(len(rows) / world_size) / micro_batch_size)
        micro = []
        for k in range(n_micro):
            part = mine[k * micro_batch_size: (k + 1) * micro_batch_size]
            # A rank that runs out still joins the collective: one dummy row that contributes nothing.
            micro.append(MicroBatch(part, [False] * len(part)) if part else MicroBatch([rows[0]], [True]))
        steps.append((rows, micro))
    return steps


@dataclasses.dataclass
class PackedBatch:
    """A micro-batch as one row with each prompt once, followed by the responses that share it (a GRPO group's
    G samples), no padding:

        input_ids [1, T], position_ids [1, T]: a prompt at positions 0..P-1, each response at P, P + 1, ... as
            if it followed its prompt alone (the RoPE positions of `pad_batch`'s layout);
        attention: the segments for `packed_attention` (a prompt attends to itself causally, a response to its
            prompt and its own tokens up to itself), so each response's hidden states equal `pad_batch`'s;
        scored [N]: the positions whose next token is a response token (a prompt's last token for a response's
            first, then each response token but the last), in the row-major order of response_mask;
        targets [N]: those next tokens;
        response_mask [B, C] float (1.0 on response tokens; a dummy row's all zero, and not scored), response
            width C: the per-sequence view the loss works on.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: PackedAttention
    scored: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor
    response_width: int


def pack_batch(batch: TrainBatch, rows: list[int], pad_id: int, empty: list[bool] | None = None) -> PackedBatch:
    """Pack the chosen rows of a TrainBatch; rows with equal prompt ids share their prompt's positions.
    (`pad_id` is unused: the packed row has no padding; kept so both layouts are called alike.)"""
    empty = empty or [False] * len(rows)
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> positions b in `rows`, first appearance first
    for b, i in enumerate(rows):
        prompt = tuple(batch.input_ids[i][: batch.prompt_lens[i]])
        if not prompt:
            raise ValueError(f"row {i} has an empty prompt: its first response token has no position to be "
                             "predicted from")
        groups.setdefault(prompt, []).append(b)
    responses = [batch.input_ids[i][batch.prompt_lens[i]:] for i in rows]
    ids: list[int] = []
    positions: list[int] = []
    segments: list[tuple[int, list[tuple[int, int]]]] = []  # (prompt start, [(response start, length)])
    scored_at: list[list[int]] = [[] for _ in rows]
    for prompt, members in groups.items():
        start = len(ids)
        ids += prompt
        positions += range(len(prompt))
        spans = []
        for b in members:
            response = responses[b]
            at = len(ids)
            ids += response
            positions += range(len(prompt), len(prompt) + len(response))
            spans.append((at, len(response)))
            if response and not empty[b]:
                # Response token j is predicted at the position before it: the prompt's last for j = 0.
                scored_at[b] = [start + len(prompt) - 1] + list(range(at, at + len(response) - 1))
        segments.append((start, len(prompt), spans))
    width_c = max(1, max(map(len, responses)))
    mask = torch.zeros((len(rows), width_c), dtype=torch.float32)
    for b, response in enumerate(responses):
        if response and not empty[b]:
            mask[b, : len(response)] = 1.0
    scored = torch.tensor([i for at in scored_at for i in at], dtype=torch.long)
    targets = torch.tensor([t for b, response in enumerate(responses) if response and not empty[b]
                            for t in response], dtype=torch.long)
    return PackedBatch(torch.tensor([ids], dtype=torch.long), torch.tensor([positions], dtype=torch.long),
                       packed_segments(segments, len(ids)), scored, targets, mask, width_c)
