"""The critics StitchVM replaces: decode-and-score at the end, at a Tweedie estimate, or after Monte-Carlo rollouts.

Every critic answers ``value(z_t, sigma, prompts) -> (B,)`` (docs/design.md), an estimate of
V_t(z_t) = E[r(x_0) | z_t]:

    critic     estimate of V(z_t)                                          cost per value
    terminal   r(D(z_0)), defined at sigma = 0 only                        1 decode + 1 reward
    tweedie    r(D(z_hat_0)),  z_hat_0 = z_t - sigma * v_theta(z_t, sigma)   1 DiT + 1 decode + 1 reward
    mc         (1/K) sum_k r(D(z_0^(k))), z_0^(k) ~ policy SDE from z_t      K * (steps DiT + decode + reward)

``tweedie`` is the one-step posterior-mean estimate (for rectified flow, E[z_0 | z_t] = z_t - sigma E[v | z_t]),
differentiable in z_t through the denoiser, VAE decoder and reward model — the chain Tweedie-DPS differentiates.
``mc`` is the costly truth the value benchmark compares against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policies import samplers
from policies.flow import FlowPolicy


def _sigma_batch(sigma: Tensor | float, z: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device)
    sigma = sigma.expand(z.shape[0]) if sigma.ndim == 0 else sigma
    if sigma.shape != (z.shape[0],):
        raise ValueError(f"sigma must be a float or shape ({z.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def denoise(policy: FlowPolicy, z_t: Tensor, sigma: Tensor | float, prompts: list[str],
            guidance_scale: float = 1.0) -> Tensor:
    """Tweedie's one-step estimate z_hat_0 = z_t - sigma * v_theta(z_t, sigma | prompts) (CFG at guidance_scale)."""
    sigma = _sigma_batch(sigma, z_t)
    v = policy.velocity(z_t, sigma, policy.encode_prompts(prompts), guidance_scale)
    return z_t - sigma.view(-1, 1, 1, 1).to(v.dtype) * v


class _DecodeScoreCritic(nn.Module):
    """Shared parts: the policy (for its VAE / velocity) and a pixel reward."""

    def __init__(self, policy: FlowPolicy, reward: nn.Module):
        super().__init__()
        self.policy = policy
        self.reward = reward

    @property
    def latent_channels(self) -> int:
        return self.policy.latent_channels

    @property
    def latent_size(self) -> int:
        return self.policy.latent_size

    def score_latents(self, z_0: Tensor, prompts: list[str]) -> Tensor:
        """r(D(z_0)), float32 (B,)."""
        return self.reward(self.policy.decode(z_0), prompts).float()


class TerminalCritic(_DecodeScoreCritic):
    """The reward of finished samples: what trainers use without a critic. Only sigma = 0 has a value."""

    dense = False

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: list[str]) -> Tensor:
        sigma = _sigma_batch(sigma, z_t)
        if (sigma != 0).any():
            raise ValueError("the terminal critic scores finished samples only (sigma = 0); for noisy latents use "
                             "a value critic: stitchvm, tweedie or mc")
        return self.score_latents(z_t, prompts)


class TweedieCritic(_DecodeScoreCritic):
    """Decode-and-score at the one-step estimate z_hat_0 = z_t - sigma * v_theta(z_t, sigma | prompt).

    Args:
        policy: the flow policy whose velocity and VAE are used (its active LoRA adapter).
        reward: pixel reward ``(images, prompts) -> (B,)``.
        guidance_scale: CFG weight for the denoiser (1.0 = conditional velocity only).
    """

    dense = True

    def __init__(self, policy: FlowPolicy, reward: nn.Module, guidance_scale: float = 1.0):
        super().__init__(policy, reward)
        self.guidance_scale = guidance_scale

    def denoise(self, z_t: Tensor, sigma: Tensor | float, prompts: list[str]) -> Tensor:
        return denoise(self.policy, z_t, sigma, prompts, self.guidance_scale)

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: list[str]) -> Tensor:
        return self.score_latents(self.denoise(z_t, sigma, prompts), prompts)


class MonteCarloCritic(_DecodeScoreCritic):
    """V_MC(z_t): average reward of K policy rollouts from z_t to sigma = 0.

    The rollouts follow the policy's SDE (``eta`` > 0 so the K samples differ) on the tail of the
    ``num_steps`` schedule below sigma_t. Not differentiable (no_grad): a reference, not a guide.

    Args:
        policy, reward: as for :class:`TweedieCritic`.
        num_rollouts: K.
        num_steps: length of the full schedule whose sigmas < sigma_t are visited.
        eta: SDE noise level of the rollouts.
        guidance_scale: CFG weight of the rollouts.
        seed: base seed of the rollout noise (values are reproducible).
    """

    dense = True
    differentiable = False  # no_grad rollouts: steering with a gradient (DPS) refuses it up front

    def __init__(self, policy: FlowPolicy, reward: nn.Module, num_rollouts: int = 8, num_steps: int = 20,
                 eta: float = 0.7, guidance_scale: float = 1.0, seed: int = 0):
        super().__init__(policy, reward)
        if num_rollouts < 1:
            raise ValueError(f"num_rollouts must be >= 1, got {num_rollouts}")
        self.num_rollouts, self.num_steps, self.eta = num_rollouts, num_steps, eta
        self.guidance_scale, self.seed = guidance_scale, seed

    def schedule_from(self, sigma: float, device: torch.device) -> Tensor:
        full = self.policy.sigmas(self.num_steps, device)
        return torch.cat([torch.tensor([sigma], device=device, dtype=full.dtype), full[full < sigma]])

    @torch.no_grad()
    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: list[str]) -> Tensor:
        sigma = _sigma_batch(sigma, z_t)
        values = torch.empty(z_t.shape[0], device=z_t.device)
        generator = torch.Generator(z_t.device).manual_seed(self.seed)
        for s in sigma.unique():
            rows = (sigma == s).nonzero().flatten()
            sub_prompts = [prompts[i] for i in rows.tolist()]
            if float(s) == 0.0:
                values[rows] = self.score_latents(z_t[rows], sub_prompts)
                continue
            k = self.num_rollouts
            cond = self.policy.encode_prompts(sub_prompts).repeat(k)
            z = z_t[rows].repeat_interleave(k, 0)  # (n*K, C, h, w), each start K times in a row
            traj = samplers.sample(self.policy.velocity_fn(cond, self.guidance_scale), z,
                                   self.schedule_from(float(s), z.device), eta=self.eta, generator=generator,
                                   keep_latents=False)
            rewards = self.score_latents(traj.z_tau, [p for p in sub_prompts for _ in range(k)])
            values[rows] = rewards.view(len(rows), k).mean(1)
        return values
