"""Shared advantage math: group normalisation (GRPO / NFT), DiffusionNFT's optimality probability, dense
per-step advantages from a critic. Pure functions of tensors."""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------------------------------------ dense (critic)
def gae_advantages(values: Tensor, lam: float) -> Tensor:
    """Per-step advantages from values along a trajectory, GAE(lambda) with gamma = 1 and no intermediate reward.

    The sampler is an MDP whose state is z_k, whose action is z_{k+1} and whose only reward is R at the end, so
    Q(z_k, z_{k+1}) = V(z_{k+1}) and the one-step advantage is the value gained by the step,
    delta_k = V(z_{k+1}) - V(z_k). GAE mixes the n-step estimates:

        A_k = sum_{l >= 0} lambda^l delta_{k+l}

    lambda = 0: A_k = V(z_{k+1}) - V(z_k) (lowest variance; biased where V is wrong);
    lambda = 1: A_k = V_N - V(z_k) = R - V(z_k) (V as a state baseline: unbiased for any V).

    Args:
        values: (B, N+1) values at z_0..z_N of each trajectory; put the realised reward in the last column
            (``values[:, -1] = R``) so the advantages telescope to R.
        lam: lambda in [0, 1].
    Returns:
        (B, N) float32 advantages; with lam = 0, ``sum_k A_k = values[:, -1] - values[:, 0]``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"GAE lambda must be in [0, 1], got {lam}")
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"values must be (B, N+1) with N >= 1, got {tuple(values.shape)}")
    v = values.float()
    delta = v[:, 1:] - v[:, :-1]  # (B, N)
    adv = torch.empty_like(delta)
    running = torch.zeros_like(delta[:, 0])
    for k in range(delta.shape[1] - 1, -1, -1):  # A_k = delta_k + lambda A_{k+1}
        running = delta[:, k] + lam * running
        adv[:, k] = running
    return adv


def normalize_step_advantages(adv: Tensor, mask: Tensor, group_size: int, scale: str = "global",
                              eps: float = 1e-4) -> Tensor:
    """Centre per-step advantages within each (group, step) and rescale; entries outside ``mask`` become 0.

    Centring removes what the samples of one prompt share at one step: for dense advantages that is the
    critic's systematic drift along sigma (E[V(z_{k+1}) - V(z_k) | z_k] = 0 for an exact critic, so a non-zero
    group mean is critic error); for sparse ones broadcast over steps it is GRPO's group mean.

    Args:
        adv: (B, N) per-step advantages, rows in consecutive groups of ``group_size`` (one prompt each).
        mask: (B, N) bool, the entries that count (the stochastic steps); rows of a group must share it.
        group_size: G (use B to centre over the whole batch).
        scale: "global" divides by the std of every masked entry of the batch (keeps the relative weight of
            steps), "group_step" by the std of each (group, step) (GRPO's per-group std applied per step),
            "none" only centres.
        eps: added to the std.
    Returns:
        (B, N) float32.
    """
    if scale not in ("global", "group_step", "none"):
        raise ValueError(f"scale must be 'global', 'group_step' or 'none', got {scale!r}")
    if adv.shape != mask.shape or adv.ndim != 2:
        raise ValueError(f"adv and mask must both be (B, N), got {tuple(adv.shape)} and {tuple(mask.shape)}")
    if group_size < 1 or adv.shape[0] % group_size:
        raise ValueError(f"batch of {adv.shape[0]} rows is not a whole number of groups of {group_size}")
    a = adv.float().view(-1, group_size, adv.shape[1])  # (P, G, N)
    m = mask.view_as(a).float()
    if group_size > 1 and not bool((m == m[:, :1]).all()):
        raise ValueError("every row of a group must have the same stochastic steps (mask)")
    count = m.sum(1, keepdim=True).clamp_min(1)
    mean = (a * m).sum(1, keepdim=True) / count
    centred = (a - mean) * m
    if scale == "group_step":
        centred = centred / (((centred**2).sum(1, keepdim=True) / count).sqrt() + eps)
    elif scale == "global":
        n = m.sum().clamp_min(1)
        centred = centred / ((centred**2).sum() / n).sqrt().add(eps)
    return centred.view_as(adv)


def ode_values(values: Tensor, rewards: Tensor, mask: Tensor) -> Tensor:
    """Exact values across the sampler's deterministic steps: V(z_N) = R and V(z_k) = V(z_{k+1}) wherever step k
    is an ODE step (``mask`` False), the critic's V(z_k) only where step k is stochastic.

    Under the rollout policy an ODE step is a deterministic map, so E[R | z_k] = E[R | z_{k+1}]: after the last
    stochastic step of a Flow-GRPO-Fast window the value *is* the realised reward, and no critic estimate is
    needed (or wanted) there. With GAE lambda = 0 the window's advantages (before centring and scaling) then sum
    to R - V(z_window start) exactly.

    Args:
        values: (B, N+1) V(z_0)..V(z_N) from the critic; entries at latents that begin an ODE step (and the last)
            are not read, so they may be NaN (``value_steps`` lists the ones that are).
        rewards: (B,) realised rewards R.  mask: (B, N) bool, the stochastic steps.
    Returns:
        (B, N+1) float32.
    """
    if values.ndim != 2 or mask.shape != (values.shape[0], values.shape[1] - 1):
        raise ValueError(f"values (B, N+1) and mask (B, N) disagree: {tuple(values.shape)}, {tuple(mask.shape)}")
    v = values.float().clone()
    v[:, -1] = rewards.float()
    for k in range(mask.shape[1] - 1, -1, -1):
        v[:, k] = torch.where(mask[:, k], v[:, k], v[:, k + 1])
    return v


def value_steps(mask: Tensor) -> list[int]:
    """The latents whose critic value :func:`ode_values` reads: z_k for every k that is a stochastic step of some
    row of ``mask`` (B, N). With one 2-step Fast window for every row that is 2 of the N+1 latents; rows of
    several rollout rounds (several windows) need the union."""
    return [int(k) for k in torch.nonzero(mask.any(0)).flatten()]


def calibrate_values(values: Tensor, rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Rescale each latent's critic values around their group mean by the batch's within-group least-squares slope
    of the realised reward on the value, one slope per latent index k:

        beta_k = max(0, sum_i (V_ik - mean_g V_k)(R_i - mean_g R) / sum_i (V_ik - mean_g V_k)^2)
        V_ik  <-  mean_g V_k + beta_k (V_ik - mean_g V_k)

    Why: R is an unbiased one-rollout sample of V*(z_k) = E[R | z_k], so beta_k (V - mean) is the best linear
    predictor of V* - mean V* from the critic within groups. Only within-group differences of V reach the centred
    advantages (normalize_step_advantages), so this is all a per-step affine recalibration can change. A critic whose
    within-group differences carry little information at sigma_k (StitchVM near sigma = 1, where one SDE step
    re-randomises most of the outcome: benchmarks/window_credit.py) then hands that step little credit instead of
    noise at the scale of the reward's; an informative one keeps its split at the right scale. A negative slope is
    taken as 0 (no credit from V), not as an inverted critic.

    Args:
        values: (B, N+1); entries the critic was not asked at are non-finite and left as they are. A group's rows
            share them: a latent index asked in some groups only (GRPO's ``values_at: trained``) is calibrated on
            those groups.
        rewards: (B,) R.  group_size: G, rows in consecutive groups.
    Returns:
        (values (B, N+1) float32, beta (N+1,) float32: NaN for columns asked in no group).
    """
    if values.ndim != 2 or rewards.shape != values.shape[:1]:
        raise ValueError(f"values (B, N+1) and rewards (B,) disagree: {tuple(values.shape)}, {tuple(rewards.shape)}")
    if group_size < 2 or values.shape[0] % group_size:
        raise ValueError(f"calibration needs groups of >= 2 rows; {values.shape[0]} rows in groups of {group_size}")
    v = values.float().view(-1, group_size, values.shape[1])  # (P, G, N+1)
    r = rewards.float().view(-1, group_size, 1)
    asked = torch.isfinite(v).all(1, keepdim=True)  # (P, 1, N+1): the groups whose column k is whole
    dv = torch.where(asked, v - v.mean(1, keepdim=True), torch.zeros_like(v))
    dr = r - r.mean(1, keepdim=True)
    beta = ((dv * dr).sum((0, 1)) / (dv * dv).sum((0, 1)).clamp_min(1e-12)).clamp_min(0.0)  # (N+1,)
    out = torch.where(asked, v - dv + beta * dv, v)
    return out.view_as(values), torch.where(asked.any(0).squeeze(0), beta, torch.full_like(beta, math.nan))


def calibration_slope(values: Tensor, rewards: Tensor, group_size: int) -> float:
    """The mean of :func:`calibrate_values`' slopes over the latents the critic was asked at (a logged figure; with
    ``group_size`` < 2 the whole batch is one group, as the DDPO trainer centres it)."""
    groups = group_size if group_size >= 2 else rewards.shape[0]
    return float(calibrate_values(values, rewards, groups)[1].nanmean())


def dense_advantages(values: Tensor, rewards: Tensor, mask: Tensor, lam: float, group_size: int,
                     scale: str = "global", eps: float = 1e-4, exact_ode: bool = True,
                     calibrate: bool = False) -> Tensor:
    """Per-step advantages from a critic: GAE(lambda) on V along the trajectory, ending at the realised reward,
    then centred per (group, step) and rescaled (see :func:`gae_advantages`, :func:`normalize_step_advantages`).

    Args:
        values: (B, N+1) V(z_0)..V(z_N); the last column is replaced by ``rewards``.
        rewards: (B,) realised rewards R.
        mask: (B, N) stochastic steps (the others get 0).
        exact_ode: V carried exactly across ODE steps (:func:`ode_values`); False uses the critic at every latent
            (then ``values`` must be finite everywhere).
        calibrate: first rescale the critic's values by :func:`calibrate_values` (the trainers'
            ``dense_calibration: batch``).
    Returns:
        (B, N) float32.
    """
    if calibrate:
        values = calibrate_values(values, rewards, group_size)[0]
    if exact_ode:
        v = ode_values(values, rewards, mask)
    else:
        v = values.float().clone()
        v[:, -1] = rewards.float()
    return normalize_step_advantages(gae_advantages(v, lam), mask, group_size, scale, eps)
