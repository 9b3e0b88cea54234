"""Layout, token counts and minibatch/rank/micro-batch assignment of saferl.trainer.batching (pure CPU)."""

import pytest
import torch

from saferl.trainer.batching import MicroBatch, assign, loss_count, pad_batch
from saferl.types import TrainBatch


def _batch() -> TrainBatch:
    # row 0: prompt [11, 12],      response [21, 22, 23]
    # row 1: prompt [13, 14, 15],  response [24]
    # row 2: prompt [16],          response [25, 26]
    return TrainBatch(
        input_ids=[[11, 12, 21, 22, 23], [13, 14, 15, 24], [16, 25, 26]],
        prompt_lens=[2, 3, 1],
        old_logprobs=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6]],
        advantages=[1.0, -1.0, 0.5],
    )


def test_pad_batch_layout_hand_values():
    """Prompts are left-padded to P, responses right-padded to C, in the order of `rows`."""
    # rows [2, 0, 1]: P = max(1, 2, 3) = 3, C = max(2, 3, 1) = 3, pad id 0.
    padded = pad_batch(_batch(), [2, 0, 1], pad_id=0)
    assert padded.response_width == 3
    expected_ids = torch.tensor([
        [0, 0, 16, 25, 26, 0],     # row 2
        [0, 11, 12, 21, 22, 23],   # row 0
        [13, 14, 15, 24, 0, 0],    # row 1
    ])
    torch.testing.assert_close(padded.input_ids, expected_ids)
    expected_attn = torch.tensor([
        [0, 0, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
    ])
    torch.testing.assert_close(padded.attention_mask, expected_attn)
    expected_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(padded.response_mask, expected_mask)
    assert padded.input_ids.dtype == torch.long and padded.response_mask.dtype == torch.float32


def test_pad_batch_position_ids_start_at_first_real_token():
    """position_ids = cumsum(attention) - 1 clamped at 0: real tokens count 0, 1, 2, ... regardless of padding."""
    padded = pad_batch(_batch(), [2, 0, 1], pad_id=0)
    # row 2: attn [0,0,1,1,1,0] -> cumsum [0,0,1,2,3,3] - 1 = [-1,-1,0,1,2,2] -> clamp [0,0,0,1,2,2]
    # row 0: attn [0,1,1,1,1,1] -> cumsum [0,1,2,3,4,5] - 1 = [-1,0,1,2,3,4]  -> clamp [0,0,1,2,3,4]
    # row 1: attn [1,1,1,1,0,0] -> cumsum [1,2,3,4,4,4] - 1 = [0,1,2,3,3,3]
    expected = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 3, 3]])
    torch.testing.assert_close(padded.position_ids, expected)
    # On real tokens the positions are exactly 0..len-1 for every row.
    for b in range(3):
        real = padded.position_ids[b][padded.attention_mask[b].bool()]
        assert real.tolist() == list(range(int(padded.attention_mask[b].sum())))


def test_pad_batch_response_token_j_sits_at_column_p_plus_j():
    """Every response starts in column P, so the last C columns hold the responses (mask picks the real ones)."""
    batch = _batch()
    padded = pad_batch(batch, [0, 1, 2], pad_id=-7)
    width_p = padded.input_ids.shape[1] - padded.response_width
    assert width_p == 3
    for b in range(3):
        response = batch.input_ids[b][batch.prompt_lens[b]:]
        for j, token in enumerate(response):
            assert padded.input_ids[b, width_p + j].item() == token
        tail = padded.input_ids[b, width_p:][padded.response_mask[b].bool()]
        assert tail.tolist() == response
    # Padding uses pad_id everywhere it is not a real token.
    assert torch.all(padded.input_ids[padded.attention_mask == 0] == -7)


def test_pad_batch_empty_rows_have_zero_response_mask_but_real_tokens():
    """Rows flagged `empty` (dummy rows) keep their tokens and attention but have an all-zero response mask."""
    padded = pad_batch(_batch(), [0, 2], pad_id=0, empty=[False, True])
    torch.testing.assert_close(padded.response_mask, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    # row 2 still laid out normally: P = 2, C = 3 -> [0, 16, 25, 26, 0]
    assert padded.input_ids[1].tolist() == [0, 16, 25, 26, 0]
    assert padded.attention_mask[1].tolist() == [0, 1, 1, 1, 0]


def test_pad_batch_all_empty_responses_give_width_one():
    """With no response tokens at all C is still 1 (logits_to_keep >= 2) and the mask is zero."""
    batch = TrainBatch(input_ids=[[5, 6], [7]], prompt_lens=[2, 1], old_logprobs=[[], []], advantages=[0.0, 0.0])
    padded = pad_batch(batch, [0, 1], pad_id=0)
    assert padded.response_width == 1
    assert padded.input_ids.tolist() == [[5, 6, 0], [0, 7, 0]]
    assert padded.response_mask.tolist() == [[0.0], [0.0]]


def test_loss_count_follows_mode_and_aggregation():
    """Token count for token-mean in token-level modes, else the number of non-empty rows (always for gspo)."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 4 tokens, 2 non-empty rows
    assert loss_count(mask, "grpo", "token-mean") == 4.0
    assert loss_count(mask, "gspo-token", "token-mean") == 4.0
    for aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
        assert loss_count(mask, "grpo", aggregation) == 2.0
        assert loss_count(mask, "gspo-token", aggregation) == 2.0
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert loss_count(mask, "gspo", aggregation) == 2.0
    assert loss_count(torch.zeros(2, 3), "grpo", "token-mean") == 0.0
    assert loss_count(torch.zeros(2, 3), "gspo", "seq-mean-token-mean") == 0.0


def _all_ranks(n, minibatches, world_size, micro_batch_size, seed=0):
    return [assign(n, minibatches, world_size, rank, micro_batch_size, torch.Generator().manual_seed(seed))
            for rank in range(world_size)]


@pytest.mark.parametrize("n, minibatches, world_size, micro_batch_size", [
    (13, 2, 2, 2), (3, 4, 2, 1), (3, 4, 2, 3), (10, 3, 4, 3), (1, 1, 3, 2), (8, 1, 1, 3), (17, 3, 3, 1),
])
def test_assign_partitions_every_sample_exactly_once(n, minibatches, world_size, micro_batch_size):
    """Minibatches partition range(n); per step the ranks' real rows cover the minibatch exactly once; ranks
    agree on the minibatches and run the same number of micro-batches, each of at most micro_batch_size rows."""
    per_rank = _all_ranks(n, minibatches, world_size, micro_batch_size)
    n_steps = len(per_rank[0])
    assert n_steps == min(n, minibatches)  # empty minibatches are dropped
    assert all(len(steps) == n_steps for steps in per_rank)
    all_rows = []
    for k in range(n_steps):
        rows = per_rank[0][k][0]
        assert rows, "an empty minibatch was kept"
        assert all(steps[k][0] == rows for steps in per_rank), "ranks disagree on the minibatch"
        all_rows += rows
        real = []
        n_micro = {len(steps[k][1]) for steps in per_rank}
        assert len(n_micro) == 1, f"ranks run different micro-batch counts at step {k}: {n_micro}"
        for steps in per_rank:
            for micro in steps[k][1]:
                assert isinstance(micro, MicroBatch)
                assert 1 <= len(micro.rows) <= micro_batch_size
                assert len(micro.empty) == len(micro.rows)
                if any(micro.empty):  # a dummy micro-batch is one flagged row of this minibatch
                    assert micro.empty == [True] and micro.rows[0] in rows
                real += [r for r, e in zip(micro.rows, micro.empty) if not e]
        assert sorted(real) == sorted(rows), f"step {k}: ranks' rows {sorted(real)} != minibatch {sorted(rows)}"
    assert sorted(all_rows) == list(range(n))


def test_assign_13_samples_2_minibatches_2_ranks_hand_shapes():
    """n=13 -> minibatches of 7 and 6 rows; rank shares 4/3 and 3/3; micro-batch sizes [2,2]/[2,1], [2,1]/[2,1]."""
    rank0, rank1 = _all_ranks(13, 2, 2, 2)
    assert [len(rows) for rows, _ in rank0] == [7, 6]
    assert [[len(m.rows) for m in micros] for _, micros in rank0] == [[2, 2], [2, 1]]
    assert [[len(m.rows) for m in micros] for _, micros in rank1] == [[2, 1], [2, 1]]
    # Rank r takes every world_size-th sample of the minibatch, in order.
    for rank, steps in enumerate((rank0, rank1)):
        for rows, micros in steps:
            assert [r for m in micros for r in m.rows] == rows[rank::2]
    assert not any(e for steps in (rank0, rank1) for _, micros in steps for m in micros for e in m.empty)


def test_assign_more_minibatches_than_samples_gives_dummies():
    """n=3, minibatches=4, 2 ranks: 3 one-row steps; rank 0 trains the row, rank 1 gets one flagged dummy of it."""
    rank0, rank1 = _all_ranks(3, 4, 2, 2)
    assert len(rank0) == len(rank1) == 3
    for (rows0, micros0), (rows1, micros1) in zip(rank0, rank1):
        assert rows0 == rows1 and len(rows0) == 1
        assert [(m.rows, m.empty) for m in micros0] == [(rows0, [False])]
        assert [(m.rows, m.empty) for m in micros1] == [(rows0, [True])]


def test_assign_depends_on_the_generator_state():
    """Same seed -> same permutation; the generator advances, so the next training step gets a new order."""
    gen = torch.Generator().manual_seed(7)
    first = [rows for rows, _ in assign(20, 1, 1, 0, 4, gen)]
    second = [rows for rows, _ in assign(20, 1, 1, 0, 4, gen)]
    again = [rows for rows, _ in assign(20, 1, 1, 0, 4, torch.Generator().manual_seed(7))]
    assert first == again
    assert first != second
    assert sorted(first[0]) == sorted(second[0]) == list(range(20))


def test_assign_rejects_bad_sizes():
    """minibatches < 1 or micro_batch_size < 1 raise ValueError naming them."""
    with pytest.raises(ValueError, match="minibatches"):
        assign(4, 0, 1, 0, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="micro_batch_size"):
        assign(4, 1, 1, 0, 0, torch.Generator().manual_seed(0))


def test_assign_with_prompts_groups_a_ranks_share_by_prompt_and_keeps_steps_and_ranks():
    """With prompts, a rank's share of a step is ordered by prompt (first appearance, then the permutation's
    order), so one prompt's samples share micro-batches; each sample keeps its step and rank."""
    prompts = [(k % 3,) for k in range(12)]  # 3 prompts, 4 samples each
    for rank in (0, 1):
        plain = assign(12, 2, 2, rank, 2, torch.Generator().manual_seed(4))
        grouped = assign(12, 2, 2, rank, 2, torch.Generator().manual_seed(4), prompts)
        for (rows_a, micros_a), (rows_b, micros_b) in zip(plain, grouped):
            assert rows_a == rows_b
            mine = [r for m in micros_a for r in m.rows]
            ordered = [r for m in micros_b for r in m.rows]
            assert sorted(mine) == sorted(ordered)
            first = {}
            for k, r in enumerate(mine):
                first.setdefault(prompts[r], k)
            assert ordered == sorted(mine, key=lambda r: first[prompts[r]])
