"""Group-relative advantages against hand-computed values."""

import pytest
import torch

from saferl.trainer.advantages import group_advantages, zero_variance_groups


def test_two_groups_hand_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    # Group 0: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1          -> (-1, 0, 1)
    # Group 1: mean 1, sample std sqrt((1 + 1 + 4) / 2) = sqrt(3)    -> (-1, -1, 2) / 1.7320508
    adv = group_advantages(rewards, 3, eps=0.0)
    expected = torch.tensor([-1.0, 0.0, 1.0, -0.5773503, -0.5773503, 1.1547005])
    torch.testing.assert_close(adv, expected)
    # eps is added to the std: group 0 becomes (-1, 0, 1) / 1.5
    torch.testing.assert_close(group_advantages(rewards, 3, eps=0.5)[:3], torch.tensor([-2 / 3, 0.0, 2 / 3]))
    # Without std normalisation the advantage is only mean-centred.
    no_std = group_advantages(rewards, 3, normalize_std=False)
    torch.testing.assert_close(no_std, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]))


def test_zero_variance_group_gives_exact_zero():
    # 0.7 * 8 in float32: mean(r) differs from 0.7 by one ulp, and naive (r - mean) / (0 + 1e-6) gives ~0.056.
    rewards = torch.cat([torch.full((8,), 0.7), torch.arange(8.0)])
    adv = group_advantages(rewards, 8)
    assert torch.isfinite(adv).all()
    assert torch.all(adv[:8] == 0.0)
    assert adv[8:].abs().sum() > 0
    assert zero_variance_groups(rewards, 8).tolist() == [True, False]


def test_zero_variance_groups():
    rewards = torch.tensor([-10.0, -10.0, 1.0, 2.0, 0.5, 0.5])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True]


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="1-D"):
        zero_variance_groups(torch.zeros(2, 3), 3)
