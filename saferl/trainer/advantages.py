"""Group-relative advantages (GRPO/GSPO): normalise each reward within its group of G rollouts of one prompt.

Owns only this arithmetic. Rollouts of a prompt are consecutive: rewards[g * G : (g + 1) * G] is group g.

Choices:
- The std is the sample (unbiased, N - 1) std, as TRL's `torch.std` and verl's GRPO estimator use.
- A group whose rewards are all equal gets advantage exactly 0. Subtracting a float mean from equal values can
  leave a 1-ulp residue, and dividing that by (0 + eps) would turn it into a spurious advantage of order 0.1.
"""

from __future__ import annotations

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape rewards [N] to [n_groups, group_size], checking the sizes."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups carry no learning signal because every reward in them is equal.

    Args:
        rewards: [N] with N = n_groups * group_size, groups consecutive.
        group_size: G, rollouts per prompt.

    Returns:
        [n_groups] bool, True where all G rewards are equal.
    """
    groups = _grouped(rewards, group_size)
    return groups.amax(dim=-1) == groups.amin(dim=-1)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A = (r - mean_g) / (std_g + eps) within each group, with the sample std.

    Args:
        rewards: [N] with N = n_groups * group_size, groups consecutive.
        group_size: G, rollouts per prompt (>= 2).
        normalize_std: divide by the group std; False gives the Dr.GRPO-style mean-centred advantage.
        eps: added to the std so near-constant groups stay finite.

    Returns:
        [N] advantages in the dtype of rewards; exactly 0 for zero-variance groups.
    """
    groups = _grouped(rewards, group_size)  # [n_groups, G]
    centred = groups - groups.mean(dim=-1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(dim=-1, keepdim=True) + eps)  # unbiased (N - 1), like TRL
    flat = zero_variance_groups(rewards, group_size)  # [n_groups]
    centred = torch.where(flat.unsqueeze(-1), torch.zeros_like(centred), centred)
    return centred.reshape(-1)
