"""The trainer's entropy term (trainer.entropy_coef, #16): a negative weight is a penalty that lowers the
policy's token entropy (the sharpening mitigation of configs/toy.yaml), a positive one a bonus that raises it,
and 0 leaves the policy alone when the advantages carry no signal."""

import random

import pytest

from saferl.types import TrainBatch


def _batch(vocab: int) -> TrainBatch:
    """Four sequences with all-zero advantages: the policy-gradient term has no gradient, only the entropy
    term moves the policy."""
    g = random.Random(0)
    ids = [[g.randrange(3, vocab) for _ in range(10)] for _ in range(4)]
    return TrainBatch(ids, [4] * 4, [[0.0] * 6 for _ in ids], [0.0] * 4)


def _entropies(trainer, batch: TrainBatch, steps: int) -> list[float]:
    """The mean token entropy the trainer measures at each of `steps` updates (before each one)."""
    return [trainer.train_step(batch)["entropy"] for _ in range(steps)]


def test_a_penalty_lowers_the_entropy_a_bonus_raises_it_and_off_leaves_it(tiny_policy):
    from saferl.trainer.policy import PolicyTrainer

    model_dir, vocab = tiny_policy
    batch = _batch(vocab)
    kwargs = dict(micro_batch_size=4, minibatches=1, lr=5e-2, seed=0)
    off = _entropies(PolicyTrainer(model_dir, entropy_coef=0.0, **kwargs), batch, 3)
    assert off[-1] == pytest.approx(off[0], abs=1e-6)
    trainer = PolicyTrainer(model_dir, entropy_coef=-1.0, **kwargs)
    penalised = _entropies(trainer, batch, 4)
    assert penalised[-1] < penalised[0] - 0.05, penalised
    # A random init is near the uniform distribution, the maximum: the bonus is tested from the sharper policy.
    trainer.entropy_coef = 1.0
    rewarded = _entropies(trainer, batch, 4)
    assert rewarded[-1] > rewarded[0] + 0.05, rewarded
