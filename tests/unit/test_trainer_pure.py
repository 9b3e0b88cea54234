"""Pure helpers of the trainer and driver: the LR schedule, merging per-rank metrics, choosing the groups to train
on, and the trainer's memory-per-parameter estimate (no model, no Ray)."""

import itertools
import math
import types

import pytest
import torch

from saferl.config import load_config
from saferl.placement import trainer_bytes_per_param
from rewards.base import RewardRules
from rewards.hybrid import hybrid
from saferl.config import to_yaml
from rewards.base import apply_recipe
from saferl.train import (
    groups_of,
    n_informative,
    record_resumed_config,
    select_groups,
    trained_metrics,
)
from saferl.types import GuardVerdict, Prompt, RewardOutput, SafetyLabel, ScoredRollout, TrainBatch
from saferl.trainer.batching import assign
from saferl.trainer.policy import lr_at, merge_rank_metrics

# ---- lr_at ------------------------------------------------------------------------------------------------------


def test_lr_constant_without_warmup_is_base():
    """schedule=constant, no warm-up: every step (1-based) gets the base LR."""
    for step in (1, 2, 50, 1000):
        assert lr_at(step, 3e-4, "constant", 0, 100) == 3e-4


def test_lr_linear_warmup_then_constant():
    """Warm-up of 4 steps: base * step / 4 for steps 1..4 (reaching base at step 4), then base."""
    got = [lr_at(step, 1e-3, "constant", 4, 10) for step in range(1, 7)]
    # 1e-3 * 1/4, 2/4, 3/4, 4/4, then constant
    assert got == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_lr_cosine_after_warmup_hand_values():
    """Cosine: base * 0.5 * (1 + cos(pi * (step - warmup - 1) / (total - warmup))): the first step after
    warm-up runs at the base rate, and the rate decays towards 0 (reached only past the last step)."""
    # base 1.0, warmup 2, total 6 -> span 4.
    # step 1, 2: warm-up 0.5, 1.0
    # step 3: progress 0   -> 1.0
    # step 4: progress 1/4 -> 0.5 * (1 + cos(pi/4))  = 0.8535534
    # step 5: progress 2/4 -> 0.5 * (1 + cos(pi/2))  = 0.5
    # step 6: progress 3/4 -> 0.5 * (1 + cos(3pi/4)) = 0.1464466
    # step 8 (past the end): progress clamped at 1 -> 0, never negative or rising again
    expected = {1: 0.5, 2: 1.0, 3: 1.0, 4: 0.8535534, 5: 0.5, 6: 0.1464466, 8: 0.0}
    for step, value in expected.items():
        assert lr_at(step, 1.0, "cosine", 2, 6) == pytest.approx(value, abs=1e-7), step


def test_lr_cosine_without_warmup_is_monotone():
    """No warm-up: step 1 of 4 runs at the base rate, then 0.8535534, 0.5, 0.1464466 of it."""
    values = [lr_at(step, 2.0, "cosine", 0, 4) for step in range(1, 5)]
    assert values == pytest.approx([2.0, 1.7071068, 1.0, 0.2928932], abs=1e-7)
    assert all(a > b for a, b in itertools.pairwise(values))


def test_lr_unknown_schedule_raises():
    """An unknown schedule name raises ValueError naming it."""
    with pytest.raises(ValueError, match="linear"):
        lr_at(1, 1e-4, "linear", 0, 10)


def test_lr_unknown_schedule_raises_even_during_warmup():
    """The start-up check in PolicyTrainer relies on lr_at(1, ...) raising for an unknown schedule."""
    with pytest.raises(ValueError):
        lr_at(1, 1e-4, "linear", 5, 10)


# ---- merge_rank_metrics -----------------------------------------------------------------------------------------


def test_merge_rank_metrics_sums_counts_maxes_maxima_and_averages_the_rest():
    """Counts and tokens_per_s are summed over ranks, *_max keys take the max, means are weighted by their count."""
    per_rank = [
        {"loss_terms": 1.0, "tokens": 10.0, "tokens_per_s": 100.0, "ratio_max": 1.2, "pg_loss": 0.5,
         "grad_norm": 1.0, "clip_frac_high": 0.1, "lr": 1e-4},
        {"loss_terms": 1.0, "tokens": 30.0, "tokens_per_s": 50.0, "ratio_max": 1.5, "pg_loss": -0.1,
         "grad_norm": 3.0, "clip_frac_high": 0.3, "lr": 1e-4},
    ]
    merged = merge_rank_metrics(per_rank)
    assert merged == pytest.approx({
        "loss_terms": 2.0,
        "tokens": 40.0,           # 10 + 30
        "tokens_per_s": 150.0,    # 100 + 50: the throughput of all ranks together
        "ratio_max": 1.5,         # max(1.2, 1.5)
        "pg_loss": 0.2,           # (0.5 - 0.1) / 2: one loss term each
        "grad_norm": 2.0,         # (1 + 3) / 2
        "clip_frac_high": 0.2,    # a fraction, not a maximum: (0.1 + 0.3) / 2
        "lr": 1e-4,
    })
    assert set(merged) == set(per_rank[0])


def test_merge_rank_metrics_single_rank_is_identity():
    """With one rank every metric passes through unchanged, with counts or without any (all responses empty)."""
    one = {"loss_terms": 2.0, "tokens": 7.0, "ratio_max": 1.01, "kl": 0.003, "tokens_per_s": 12.5, "entropy": 1.5,
           "rollout_logprob_tokens": 4.0, "rollout_logprob_abs_diff": 0.01}
    assert merge_rank_metrics([one]) == one
    empty = {"loss_terms": 0.0, "tokens": 0.0, "entropy": 0.0, "grad_norm": 0.0, "lr": 1e-4,
             "rollout_logprob_tokens": 0.0, "rollout_logprob_abs_diff": 0.0, "tokens_per_s": 0.0}
    assert merge_rank_metrics([empty]) == empty


def test_merge_rank_metrics_with_ranks_that_only_ran_dummy_rows():
    """Ranks whose whole share was dummy rows count for nothing in a mean: each metric is the mean over all ranks'
    tokens or loss terms, as one rank holding the whole batch would report it."""
    # 2 samples over 4 ranks: ranks 2 and 3 get only a dummy row (nothing to train on) in their one step.
    for rank in (2, 3):
        steps = assign(2, 1, 4, rank, 16, torch.Generator().manual_seed(0))
        assert all(e for _, micros in steps for m in micros for e in m.empty)
    trained = {"pg_loss": 0.4, "clip_frac": 0.5, "ratio_mean": 1.2, "ratio_max": 1.3, "grad_norm": 0.5, "lr": 1e-4,
               "loss_terms": 2.0, "tokens": 6.0, "entropy": 2.0, "rollout_logprob_tokens": 4.0,
               "rollout_logprob_abs_diff": 0.1, "tokens_per_s": 10.0}
    trained_2 = {**trained, "pg_loss": 0.1, "clip_frac": 0.2, "ratio_mean": 0.9, "ratio_max": 1.1,
                 "loss_terms": 1.0, "tokens": 2.0, "entropy": 1.0, "rollout_logprob_tokens": 1.0,
                 "rollout_logprob_abs_diff": 0.6, "tokens_per_s": 4.0}
    # What train_step returns with no real row: counts 0, no loss metrics, zeros for the per-token means.
    dummy = {"grad_norm": 0.5, "lr": 1e-4, "loss_terms": 0.0, "tokens": 0.0, "entropy": 0.0,
             "rollout_logprob_tokens": 0.0, "rollout_logprob_abs_diff": 0.0, "tokens_per_s": 0.0}
    merged = merge_rank_metrics([trained, trained_2, dummy, dummy])
    assert merged == pytest.approx({
        "pg_loss": (2 * 0.4 + 1 * 0.1) / 3,         # 0.3, over 3 loss terms (a plain mean of ranks: 0.25)
        "clip_frac": (2 * 0.5 + 1 * 0.2) / 3,       # 0.4
        "ratio_mean": (2 * 1.2 + 1 * 0.9) / 3,      # 1.1
        "ratio_max": 1.3,
        "grad_norm": 0.5, "lr": 1e-4,
        "loss_terms": 3.0, "tokens": 8.0, "rollout_logprob_tokens": 5.0, "tokens_per_s": 14.0,
        "entropy": (6 * 2.0 + 2 * 1.0) / 8,         # 1.75 per token (with the dummies' zeros: 0.75)
        "rollout_logprob_abs_diff": (4 * 0.1 + 1 * 0.6) / 5,  # 0.2 per token (with the zeros: 0.175)
    })


# ---- select_groups / n_informative / trained_metrics ------------------------------------------------------------


def _verdict(name: str) -> GuardVerdict:
    """Unsafe for rollouts whose name starts with u, else safe (so metrics tell which rows were described)."""
    return GuardVerdict(SafetyLabel.UNSAFE if name.startswith("u") else SafetyLabel.SAFE, refusal=False)


PROMPT = Prompt("p", [{"role": "user", "content": "hello"}])  # no toy-world ground truth


def _round(names: list[str], rewards: list[float], group_size: int = 2) -> list[list[ScoredRollout]]:
    """One round's groups as the driver makes them: records scored by the hybrid recipe (helpfulness = the
    given reward, every rollout safe unless named u*), split by group id. Rollout i has i + 1 tokens."""
    records = [ScoredRollout(types.SimpleNamespace(name=n, response_ids=[1] * (i + 1), finish_reason="stop",
                                                   prompt=PROMPT, group=i // group_size),
                             _verdict(n), None, float(h))
               for i, (n, h) in enumerate(zip(names, rewards, strict=True))]
    return groups_of(apply_recipe(hybrid, records, RewardRules()))


def _round0() -> list[list[ScoredRollout]]:
    # Groups of 2: a (1, 1) flat, b (0, 1) informative, c (0.5, 0.5) flat, d (1, 0) informative.
    return _round(["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1"], [1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0])


def _round1() -> list[list[ScoredRollout]]:
    # Groups of 2: e (2, 2) flat, f (3, 4) informative, g (5, 6) informative.
    return _round(["e0", "e1", "f0", "f1", "g0", "g1"], [2.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_groups_of_splits_a_round_by_group_id():
    """A round's records become one list per prompt, in order, each record keeping its own reward."""
    groups = _round(["a0", "a1", "a2", "b0", "b1", "b2"], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], group_size=3)
    assert [[s.rollout.name for s in g] for g in groups] == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    assert [[s.reward for s in g] for g in groups] == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def test_apply_recipe_fills_each_records_reward_from_one_batch_call():
    """The hybrid caps land on the record they belong to: the unsafe u0 gets min(-10, H), the rest H."""
    records = [ScoredRollout(types.SimpleNamespace(name=n), _verdict(n), None, h, False)
               for n, h in (("s0", 2.0), ("u0", 3.0), ("s1", -20.0))]
    scored = apply_recipe(hybrid, records, RewardRules())
    assert [(s.rollout.name, s.reward) for s in scored] == [("s0", 2.0), ("u0", -10.0), ("s1", -20.0)]
    assert all(s.reward is None for s in records)  # records are frozen: the scored ones are new
    with pytest.raises(ValueError, match="returned 1 rewards for 3 rollouts"):
        apply_recipe(lambda inputs, rules: RewardOutput(total=[0.0]), records, RewardRules())


def test_n_informative_counts_groups_with_unequal_rewards():
    """n_informative = number of groups whose rewards are not all equal."""
    assert n_informative(_round0()) == 2  # b, d
    assert n_informative(_round1()) == 2  # f, g
    four = _round(["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1"], [1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0], 4)
    assert n_informative(four) == 2  # (a, b) = (1,1,0,1) and (c, d) = (.5,.5,1,0): both unequal
    assert n_informative(_round(list("xyz"), [0.3, 0.3, 0.3], 3)) == 0
    with pytest.raises(ValueError, match="group_size"):  # a group of one has no baseline
        n_informative(_round(["a0", "b0"], [1.0, 0.0], 1))


def _rows(groups: list[list[ScoredRollout]]) -> tuple[list, list[float]]:
    return [s.rollout.name for g in groups for s in g], [s.reward for g in groups for s in g]


def test_select_groups_without_dropping_takes_the_first_round_as_is():
    """drop_zero_variance=False: every group of round 0 (flat ones too), later rounds ignored."""
    assert _rows(select_groups([_round0(), _round1()], False, 4)) == (
        ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1"], [1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0])


def test_select_groups_drops_flat_groups_and_tops_up_from_later_rounds():
    """drop_zero_variance=True: informative groups of every round in order, whole groups, at most max_groups."""
    picked = select_groups([_round0(), _round1()], True, 3)
    # b, d from round 0; f from round 1; g would be a 4th group -> cut by max_groups=3.
    assert _rows(picked) == (["b0", "b1", "d0", "d1", "f0", "f1"], [0.0, 1.0, 1.0, 0.0, 3.0, 4.0])
    # Each record keeps its own helpfulness score with its rollout.
    assert [s.helpfulness for g in picked for s in g] == [0.0, 1.0, 1.0, 0.0, 3.0, 4.0]
    assert _rows(select_groups([_round0(), _round1()], True, 10)) == (
        ["b0", "b1", "d0", "d1", "f0", "f1", "g0", "g1"], [0.0, 1.0, 1.0, 0.0, 3.0, 4.0, 5.0, 6.0])
    assert _rows(select_groups([_round0(), _round1()], True, 1)) == (["b0", "b1"], [0.0, 1.0])


def test_select_groups_can_return_nothing():
    """When every group is flat the selection is empty (the driver then skips the update)."""
    flat = _round(["a0", "a1", "b0", "b1"], [1.0, 1.0, 0.0, 0.0])
    assert _rows(select_groups([flat, flat], True, 2)) == ([], [])


def test_step_metrics_describe_the_trained_groups_not_the_first_round():
    """#14.6: round 0 has a flat unsafe group (u, u: -10, -10) that is dropped and a flat safe one; the trained
    rows are the informative groups of round 1. reward/* must be theirs (unsafe 1 of 4, mean of their rewards),
    not round 0's (unsafe 2 of 4)."""
    round0 = _round(["u0", "u1", "s0", "s1"], [3.0, 3.0, 1.0, 1.0])  # both groups flat
    round1 = _round(["u2", "s2", "s3", "s4"], [2.0, 0.5, 0.25, 0.75])  # (-10, 0.5) and (0.25, 0.75) informative
    trained = select_groups([round0, round1], True, 2)
    metrics = trained_metrics(trained, [round0, round1], hybrid, RewardRules())
    assert metrics["reward/unsafe_rate"] == 0.25
    assert metrics["reward/reward_mean"] == pytest.approx((-10.0 + 0.5 + 0.25 + 0.75) / 4)
    assert metrics["reward/helpfulness_mean"] == pytest.approx((2.0 + 0.5 + 0.25 + 0.75) / 4)
    assert metrics["rollout/response_len"] == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_step_metrics_when_nothing_was_trained_describe_everything_sampled():
    """Every group flat: no crash (rollout metrics of zero rows used to divide by zero), the step is described
    by all rows generated."""
    flat = _round(["u0", "u1", "s0", "s1"], [3.0, 3.0, 1.0, 1.0])
    trained = select_groups([flat], True, 2)
    metrics = trained_metrics(trained, [flat], hybrid, RewardRules())
    assert trained == []
    assert metrics["reward/unsafe_rate"] == 0.5
    assert metrics["rollout/tokens"] == 1 + 2 + 3 + 4


def test_train_batch_is_made_from_the_trained_records():
    """Each row of the batch is one record's prompt + response with its behaviour log-probs."""
    records = [ScoredRollout(types.SimpleNamespace(prompt_ids=[1, 2], response_ids=[3 + i], logprobs=[-0.5 * i]),
                             _verdict("s"), reward=float(i)) for i in range(2)]
    batch = TrainBatch.of(records, [0.5, -0.5])
    assert (batch.input_ids, batch.prompt_lens, batch.old_logprobs, batch.advantages) == (
        [[1, 2, 3], [1, 2, 4]], [2, 2], [[-0.0], [-0.5]], [0.5, -0.5])


# ---- a resumed run records its config ---------------------------------------------------------------------------


def test_resumed_run_records_the_config_it_continues_with(tmp_path, capsys):
    """#14.10: resuming with a changed config keeps the old file for the steps it ran and writes the new one."""
    first = load_config(None, ["trainer.lr=1e-4"])
    (tmp_path / "config.yaml").write_text(to_yaml(first))
    second = load_config(None, ["trainer.lr=3e-4", "eval.every=5"])
    record_resumed_config(tmp_path, second, step=7)
    assert load_config(tmp_path / "config.yaml").trainer.lr == 3e-4
    assert load_config(tmp_path / "config.until_step_7.yaml").trainer.lr == 1e-4
    out = capsys.readouterr().out
    assert "trainer.lr" in out and "eval.every" in out and "steps 1-7" in out
    record_resumed_config(tmp_path, second, step=9)  # unchanged: nothing new is written
    assert not (tmp_path / "config.until_step_9.yaml").exists()


# ---- trainer_bytes_per_param ------------------------------------------------------------------------------------


def _bytes(*overrides: str) -> float:
    return trainer_bytes_per_param(load_config(None, list(overrides)))


def test_bytes_per_param_torch_strategy():
    """torch: fp32 weights 4 + fp32 grads 4 + Adam m, v 8 = 16, whatever the compute dtype or worker count;
    a KL reference adds one copy in the compute dtype."""
    assert _bytes("trainer.strategy=torch") == 16
    assert _bytes("trainer.strategy=torch", "trainer.dtype=bfloat16", "trainer.workers=4") == 16
    assert _bytes("trainer.strategy=torch", "trainer.dtype=bfloat16", "trainer.kl_coef=0.1") == 16 + 2
    assert _bytes("trainer.strategy=torch", "trainer.kl_coef=0.1") == 16 + 4


@pytest.mark.parametrize("stage, expected", [
    # bf16, 4 workers: weights 2, grads 2, optimizer = fp32 master 4 + Adam 8 = 12
    (0, 2 + 2 + 12),            # nothing sharded: 16
    (1, 2 + 2 + 12 / 4),        # optimizer state sharded: 7
    (2, 2 + 2 / 4 + 12 / 4),    # + gradients: 5.5
    (3, 2 / 4 + 2 / 4 + 12 / 4),  # + weights: 4
])
def test_bytes_per_param_deepspeed_bf16_by_zero_stage(stage, expected):
    """DeepSpeed bf16 on 4 workers: each ZeRO stage shards one more of optimizer state, gradients, weights."""
    got = _bytes("trainer.strategy=deepspeed", "trainer.dtype=bfloat16", "trainer.workers=4",
                 f"trainer.zero_stage={stage}")
    assert got == pytest.approx(expected)


def test_bytes_per_param_deepspeed_other_cases():
    """fp32 has no separate master copy; one worker shards nothing; a KL reference is never sharded."""
    # fp32, 2 workers, ZeRO-2: weights 4 + grads 4/2 + Adam 8/2 = 10
    assert _bytes("trainer.strategy=deepspeed", "trainer.dtype=float32", "trainer.workers=2",
                  "trainer.zero_stage=2") == pytest.approx(10.0)
    # bf16, 1 worker, ZeRO-3: 2 + 2 + 12 = 16
    assert _bytes("trainer.strategy=deepspeed", "trainer.dtype=bfloat16", "trainer.workers=1",
                  "trainer.zero_stage=3") == pytest.approx(16.0)
    # bf16, 4 workers, ZeRO-2, kl: 5.5 + reference 2 = 7.5
    assert _bytes("trainer.strategy=deepspeed", "trainer.dtype=bfloat16", "trainer.workers=4",
                  "trainer.zero_stage=2", "trainer.kl_coef=0.1") == pytest.approx(7.5)


def test_bytes_per_param_lora():
    """LoRA: frozen base weights only (fp32 under torch, compute dtype under DeepSpeed); the KL reference is
    the base model with the adapter off, so it costs nothing extra."""
    assert _bytes("trainer.strategy=torch", "trainer.lora.rank=8") == 4
    assert _bytes("trainer.strategy=torch", "trainer.lora.rank=8", "trainer.kl_coef=0.1") == 4
    assert _bytes("trainer.strategy=deepspeed", "trainer.dtype=bfloat16", "trainer.lora.rank=8",
                  "trainer.workers=4", "trainer.zero_stage=3") == 2
    assert _bytes("trainer.strategy=deepspeed", "trainer.dtype=bfloat16", "trainer.lora.rank=8",
                  "trainer.kl_coef=0.1") == 2


def test_bytes_per_param_sharding_never_increases_memory():
    """Going up a ZeRO stage, or adding workers, never raises the per-worker estimate."""
    for dtype in ("float32", "bfloat16"):
        for workers in (1, 2, 8):
            by_stage = [_bytes("trainer.strategy=deepspeed", f"trainer.dtype={dtype}", f"trainer.workers={workers}",
                               f"trainer.zero_stage={s}") for s in range(4)]
            assert all(a >= b for a, b in itertools.pairwise(by_stage)), (dtype, workers, by_stage)
    assert math.isclose(_bytes("trainer.strategy=deepspeed", "trainer.dtype=bfloat16", "trainer.workers=8",
                               "trainer.zero_stage=3"), 16 / 8)  # everything sharded 8 ways: (2 + 2 + 12) / 8
