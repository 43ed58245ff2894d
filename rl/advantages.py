"""Shared advantage math: group normalisation (GRPO / NFT), DiffusionNFT's optimality probability, dense
per-step advantages from a critic. Pure functions of tensors."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class GroupStats(NamedTuple):
    adv: Tensor   # (B,) normalised advantage
    mean: Tensor  # (B,) the group mean each row was compared with
    std: Tensor   # (B,) the std it was divided by


def group_normalize(rewards: Tensor, group_size: int, eps: float = 1e-4, global_std: bool = False) -> GroupStats:
    """A_i = (R_i - mean_group R) / (std + eps) for rows laid out as consecutive groups of ``group_size``.

    Args:
        rewards: (B,) with B = num_prompts * group_size, each prompt's samples in consecutive rows.
        group_size: G; G = 1 cannot be normalised per group (every advantage would be 0) and is an error.
        eps: added to the std (DiffusionNFT: 1e-4).
        global_std: divide by the batch std instead of the group's (Flow-GRPO option; helps small groups).
    """
    if group_size < 2:
        raise ValueError(f"group normalisation needs group_size >= 2, got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (num_prompts * {group_size},), got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    mean = r.mean(1, keepdim=True).expand_as(r)
    std = (r.std(unbiased=False).expand_as(r) if global_std else r.std(1, unbiased=False, keepdim=True).expand_as(r))
    adv = (r - mean) / (std + eps)
    return GroupStats(adv.flatten(), mean.flatten(), std.flatten())


def optimality_probability(adv: Tensor, clip: float = 5.0) -> Tensor:
    """DiffusionNFT's r = clip(1/2 + 1/2 * clip(A, -C, C) / C, 0, 1): the group mean maps to r = 1/2.

    With a value critic, A = (V(z_tau) - group mean) / std, so this is StitchVM's
    r~ = 1/2 + 1/2 clip((V - mean) / Z, -1, 1) with Z = C * std (paper Eq. 73).
    """
    if clip <= 0:
        raise ValueError(f"advantage clip C must be > 0, got {clip}")
    return (0.5 + 0.5 * adv.clamp(-clip, clip) / clip).clamp(0, 1)


def dense_step_advantages(values: Tensor, final_reward: Tensor | None = None) -> Tensor:
    """Per-step advantages from a critic along a trajectory: A_k = V(z_{k+1}) - V(z_k), the value gained by step k.

    Args:
        values: (B, K+1) critic values at z_0..z_K of the trajectory (z_0 = noise here).
        final_reward: optional (B,) realised reward; if given it replaces V at the last latent, so the
            advantages telescope to R - V(z_T) exactly.
    Returns:
        (B, K) advantages; ``sum_k A_k = V(z_K) - V(z_0)`` (or ``R - V(z_0)``).
    """
    v = values.float().clone()
    if final_reward is not None:
        v[:, -1] = final_reward.float()
    return v[:, 1:] - v[:, :-1]
