"""The token penalties on implausible tokens (trainer.unlikelihood_coef, trainer.implausible_mass_coef, #16):
hand values of the pure maths, the mask in the trainer's layout, the config's one definition of an implausible
token, and the trainer's update lowering exactly the flagged tokens whatever the micro-batching."""

import math
import random

import pytest
import torch

from saferl.config import ConfigError, load_config
from saferl.trainer.unlikelihood import (count_implausible, implausible_mask, implausible_mass_loss,
                                         unlikelihood_loss)
from saferl.types import TrainBatch


def test_the_loss_is_the_mean_of_minus_log_one_minus_p_over_flagged_tokens_by_hand():
    # p = 0.5, 0.9 flagged in row 0; p = 0.2 flagged in row 1; unflagged and padded tokens do not count.
    lp = torch.log(torch.tensor([[0.5, 0.9, 0.3], [0.2, 0.7, 0.0]])).requires_grad_()
    flagged = torch.tensor([[True, True, False], [True, False, False]])
    loss, terms = unlikelihood_loss(lp, flagged, count=3)
    by_hand = (-math.log(0.5) - math.log(0.1) - math.log(0.8)) / 3  # = (0.6931 + 2.3026 + 0.2231) / 3
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-5)
    by_token = [[-math.log(0.5), -math.log(0.1), 0.0], [-math.log(0.8), 0.0, 0.0]]
    assert torch.allclose(terms, torch.tensor(by_token), rtol=1e-5)
    loss.backward()
    # d/dlp -log(1 - e^lp) = p / (1 - p), over N: 1/3, 3, 1/4 (divided by 3); nothing on the rest. Catches a
    # sign flip (which would raise the flagged tokens) and a term that leaks onto unflagged tokens.
    expected = torch.tensor([[1.0, 9.0, 0.0], [0.25, 0.0, 0.0]]) / 3
    assert torch.allclose(lp.grad, expected, atol=1e-5)


def test_count_is_the_minibatch_normaliser_not_the_micro_batch_own():
    # Two micro-batches of one minibatch, each divided by the minibatch's N = 3, add up to its mean: a term
    # divided by its own flagged count would weigh the lone token of the second micro-batch twice as much.
    lp = torch.log(torch.tensor([[0.5, 0.9], [0.2, 0.5]]))
    flagged = torch.tensor([[True, True], [True, False]])
    whole, _ = unlikelihood_loss(lp, flagged, count=3)
    parts = (unlikelihood_loss(lp[:1], flagged[:1], count=3)[0]
             + unlikelihood_loss(lp[1:], flagged[1:], count=3)[0])
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_no_flagged_token_gives_zero_and_a_certain_token_stays_finite():
    lp = torch.zeros(2, 3, requires_grad=True)  # p = 1 everywhere (also what padding holds in the trainer)
    loss, _ = unlikelihood_loss(lp, torch.zeros(2, 3, dtype=torch.bool), count=0)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 3))  # no NaN from 0 * log(0) on padding
    sure = torch.tensor([[0.0, -1e-9]], requires_grad=True)
    loss, _ = unlikelihood_loss(sure, torch.tensor([[True, True]]), count=2)
    assert float(loss.detach()) == pytest.approx(-math.log(1e-5), rel=1e-4)  # 1 - p clamped at 1e-5: bounded
    loss.backward()
    assert torch.isfinite(sure.grad).all()


def test_the_mass_penalty_pushes_every_flagged_token_by_one_over_the_sequences_by_hand():
    # p = 0.5 and 0.002 flagged: the mass gradient is 1 / B on each (the score-function estimate of the
    # implausible mass's gradient), where the unlikelihood term's is p / (1 - p) / N: 0.5 and 0.001.
    lp = torch.log(torch.tensor([[0.5, 0.9], [0.002, 0.3]])).requires_grad_()
    flagged = torch.tensor([[True, False], [True, False]])
    mass = implausible_mass_loss(lp, flagged, sequences=4)
    assert float(mass.detach()) == pytest.approx((math.log(0.5) + math.log(0.002)) / 4, rel=1e-5)
    mass.backward()
    # Catches a sign flip (raising the slips) and a p-weighting that would leave the rare slip unmoved.
    assert torch.allclose(lp.grad, torch.tensor([[0.25, 0.0], [0.25, 0.0]]))
    lp.grad = None
    unlikelihood_loss(lp, flagged, count=2)[0].backward()
    assert lp.grad[1, 0] == pytest.approx(0.002 / 0.998 / 2, rel=1e-3)  # the rare slip: 500x weaker
    assert float(implausible_mass_loss(lp, torch.zeros(2, 2, dtype=torch.bool), 0).detach()) == 0.0


def test_the_mask_follows_the_micro_batch_rows_and_ignores_what_lies_past_a_response():
    reference = [[-1.0, -5.0, -0.1], [-4.0, -4.5], [], [-9.0]]
    mask = implausible_mask(reference, rows=[3, 1, 0, 2], width=3, threshold=-4.0)
    # Row order is the micro-batch's; -4.0 itself is not below the threshold (strict, like the gate's <).
    assert mask.tolist() == [[True, False, False], [False, True, False], [False, True, False],
                             [False, False, False]]
    assert implausible_mask(reference, [0], width=2, threshold=-4.0).tolist() == [[False, True]]
    assert count_implausible(reference, [0, 1, 2, 3], -4.0) == 3
    assert count_implausible(reference, [2], -4.0) == 0


def test_the_config_reuses_the_fluency_gate_threshold_and_names_the_key(tmp_path):
    cfg = load_config("configs/toy.yaml", ["trainer.unlikelihood_coef=0.5"])
    assert cfg.trainer.unlikelihood_coef == 0.5 and cfg.reward.rules.fluency_min_logprob == -4.0
    assert load_config("configs/toy.yaml").trainer.unlikelihood_coef == 0.0  # off by default
    with pytest.raises(ConfigError, match=r"trainer\.unlikelihood_coef.*reward\.rules\.fluency_min_logprob"):
        load_config("configs/toy.yaml", ["trainer.unlikelihood_coef=0.5",
                                         "reward.rules.fluency_min_logprob=null"])
    with pytest.raises(ConfigError, match=r"trainer\.unlikelihood_coef"):
        load_config("configs/toy.yaml", ["trainer.unlikelihood_coef=-0.1"])
    assert load_config("configs/toy.yaml").trainer.implausible_mass_coef == 0.0
    with pytest.raises(ConfigError, match=r"implausible_mass_coef.*reward\.rules\.fluency_min_logprob"):
        load_config("configs/toy.yaml", ["trainer.implausible_mass_coef=0.5",
                                         "reward.rules.fluency_min_logprob=null"])


def test_the_roles_hand_the_gate_threshold_to_the_trainer():
    from saferl.roles import role_specs

    cfg = load_config("configs/toy.yaml", ["trainer.unlikelihood_coef=0.5",
                                           "trainer.implausible_mass_coef=0.2",
                                           "reward.rules.fluency_min_logprob=-3"])
    trainer = next(s for s in role_specs(cfg, build=False) if s.role == "trainer")
    assert trainer.kwargs["unlikelihood_coef"] == 0.5 and trainer.kwargs["implausible_logprob"] == -3.0
    assert trainer.kwargs["implausible_mass_coef"] == 0.2


def _batch(vocab: int) -> TrainBatch:
    """Four sequences with all-zero advantages (the policy-gradient term has no gradient, so only the
    unlikelihood term moves the policy); reference log-probs flag two tokens of the first two sequences."""
    g = random.Random(0)
    ids = [[g.randrange(3, vocab) for _ in range(10)] for _ in range(4)]
    reference = [[-1.0] * 6 for _ in ids]
    reference[0][2] = reference[1][5] = -7.0
    return TrainBatch(ids, [4] * 4, [[0.0] * 6 for _ in ids], [0.0] * 4, reference_logprobs=reference)


def _logprobs(trainer, batch) -> list[list[float]]:
    return trainer.sequence_logprobs(batch)


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


TERMS = [dict(unlikelihood_coef=1.0), dict(implausible_mass_coef=1.0)]


@pytest.mark.parametrize("terms", TERMS, ids=["unlikelihood", "mass"])
@pytest.mark.parametrize("micro_batch_size", [4, 1])
def test_the_update_lowers_the_flagged_tokens_most_whatever_the_micro_batching(tiny_policy, micro_batch_size,
                                                                               terms):
    from saferl.trainer.policy import PolicyTrainer

    model_dir, vocab = tiny_policy
    batch = _batch(vocab)
    kwargs = dict(minibatches=1, lr=5e-2, seed=0, micro_batch_size=micro_batch_size)
    trainer = PolicyTrainer(model_dir, implausible_logprob=-4.0, **terms, **kwargs)
    before = _logprobs(trainer, batch)
    metrics = trainer.train_step(batch)
    after = _logprobs(trainer, batch)
    drop = {(i, t): before[i][t] - after[i][t] for i in range(4) for t in range(6)}
    flagged = [(0, 2), (1, 5)]
    assert metrics["implausible_tokens"] == 2.0
    p = [math.exp(before[i][t]) for i, t in flagged]
    assert metrics["implausible_prob"] == pytest.approx(sum(p) / 2, rel=1e-4)
    assert metrics["unlikelihood"] == pytest.approx(sum(-math.log(1 - q) for q in p) / 2, rel=1e-4)
    # The flagged tokens lose the most log-prob (a shared model moves the others a little, and not downwards
    # on average, since their probability mass has to go somewhere).
    assert all(drop[f] > 0.05 for f in flagged), drop
    assert min(drop[f] for f in flagged) > max(v for k, v in drop.items() if k not in flagged)


@pytest.mark.parametrize("terms", TERMS, ids=["unlikelihood", "mass"])
def test_one_micro_batch_or_four_give_the_same_update(tiny_policy, terms):
    from saferl.trainer.policy import PolicyTrainer

    model_dir, vocab = tiny_policy
    batch = _batch(vocab)
    batch.reference_logprobs[0][4] = -9.0  # sequence 0 has two flagged tokens, sequence 1 one
    batch.advantages = [1.0, -1.0, 0.5, -0.5]  # a policy-gradient term, so the two terms' balance matters
    out = []
    for size in (4, 1):
        trainer = PolicyTrainer(model_dir, implausible_logprob=-4.0, minibatches=1, lr=5e-2, seed=0,
                                micro_batch_size=size, **terms)
        trainer.train_step(batch)
        out.append(torch.tensor(_flat(_logprobs(trainer, batch))))
    # The term is the minibatch's however it is cut (each micro-batch divides by the minibatch's N or B): a
    # micro-batch divided by its own count would weigh sequence 1's token as both of sequence 0's.
    assert torch.allclose(out[0], out[1], atol=1e-4)


def test_off_leaves_the_policy_alone_and_on_without_reference_log_probs_raises(tiny_policy):
    from saferl.trainer.policy import PolicyTrainer

    model_dir, vocab = tiny_policy
    batch = _batch(vocab)
    off = PolicyTrainer(model_dir, minibatches=1, lr=5e-2, seed=0, micro_batch_size=4)
    before = _logprobs(off, batch)
    assert "unlikelihood" not in off.train_step(batch)
    # Zero advantages and no term: nothing moves.
    assert _flat(_logprobs(off, batch)) == pytest.approx(_flat(before), abs=1e-6)
    on = PolicyTrainer(model_dir, unlikelihood_coef=1.0, implausible_logprob=-4.0, minibatches=1, seed=0)
    bare = TrainBatch(batch.input_ids, batch.prompt_lens, batch.old_logprobs, batch.advantages)
    with pytest.raises(ValueError, match="reference token log-probs"):
        on.train_step(bare)
    with pytest.raises(ValueError, match="implausible_logprob"):
        PolicyTrainer(model_dir, unlikelihood_coef=1.0)
    with pytest.raises(ValueError, match="implausible_logprob"):
        PolicyTrainer(model_dir, implausible_mass_coef=1.0)
