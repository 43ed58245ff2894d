"""A critic on the policy's denoised estimate (ours, session 19): the StitchVM fed Tweedie's latent, not z_t.

    x̂0 = z_t − σ v_θ(z_t, σ | c)                  (Tweedie's one-step posterior mean, the policy's CFG velocity)
    ẑ_k = (1 − σ_in) x̂0 + σ_in ε_k, ε_k fixed      (re-noised to the level the critic ranks best at)
    V(z_t) = 1/K Σ_k C(ẑ_k, σ_in)                  C: a StitchVM, the low-σ expert; K = noise_draws (1 by default)

Why (docs/critic.md, session 19). The low-σ expert ranks near-clean latents well (ρ .93 against V_MC at σ 0.1)
but loses at σ 0.5 (.78-.80, Tweedie .84-.88): inside its frozen head it must do the denoising the whole DiT does
for Tweedie. Given x̂0 re-noised to σ_in 0.15 it ranks the σ-0.5 latents at .847 / .889 and the σ-0.25 ones at
.931 / .936 (validation / test prompts, CPU), with no VAE decode and no pixel reward: one policy velocity (two DiT
passes with CFG) and one critic pass, ~0.4x Tweedie's cost on CPU. In a trainer that samples, v_θ(z_t) is the
step's own velocity. Above σ ~0.5, x̂0 is a blur the expert was never trained on (.50 at σ 0.75 against the uniform
expert's .61): route those σ to a critic on z_t (``critics.load.stitchvm_experts_denoised``).

ε is drawn once per latent shape from ``seed``, so V is a deterministic function of z_t (steering differentiates
it; the trainers' advantages compare values of one call). Latents already at σ ≤ σ_in are valued as they are.
With ``noise_draws`` K > 1 the critic values K re-noisings of the one x̂0 (draw k from seed + k, so draw 0 is the
K = 1 critic's) and V is their mean: the part of the critic's error that is the draw of ε averages out, for K critic
passes (one batch of K·B) and still one policy velocity. σ_in may also grow with σ (knots of a piecewise-linear
σ_in(σ)): the level that ranks best rises with σ, from 0.05 at σ 0.1 to 0.15 at σ 0.5 (session 22).
Differentiable in z_t through the critic and the policy's velocity, as Tweedie is through the decoder.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from critics.baselines import _sigma_batch, denoise


def sigma_in_knots(sigma_in: float | Sequence[Sequence[float]]) -> Tensor | None:
    """None for one σ_in in (0, 1); the knots (n, 2) float64 of a σ_in(σ) schedule; a ValueError that says what a valid
    setting looks like otherwise."""
    if isinstance(sigma_in, Tensor) and sigma_in.dim() == 0:
        sigma_in = float(sigma_in)
    if isinstance(sigma_in, numbers.Real) and not isinstance(sigma_in, bool):  # numpy scalars too
        if not 0 < sigma_in < 1:
            raise ValueError(f"sigma_in must be in (0, 1) (the noise level x̂0 is valued at), got {sigma_in}")
        return None
    try:
        knots = torch.tensor([[float(a), float(b)] for a, b in sigma_in], dtype=torch.float64)
    except (TypeError, ValueError):
        knots = None
    if knots is None or len(knots) == 0 or not bool(((knots > 0) & (knots <= 1)).all()) \
            or not bool((knots[:, 1] < knots[:, 0]).all()) or not bool((knots[1:, 0] > knots[:-1, 0]).all()):
        raise ValueError(f"sigma_in must be a number in (0, 1) or knots [[sigma, sigma_in], ...] with sigma increasing "
                         f"in (0, 1] and 0 < sigma_in < sigma (e.g. [[0.1, 0.05], [0.5, 0.15]]), got {sigma_in!r}")
    return knots


class DenoisedCritic(nn.Module):
    """V(z_t) = critic((1 − σ_in)(z_t − σ v_θ) + σ_in ε, σ_in); z_t itself where σ ≤ σ_in.

    Args:
        policy: the flow policy whose velocity gives x̂0 (its active LoRA adapter).
        critic: a dense critic of the policy's latent space (a StitchVM; the low-σ expert).
        sigma_in: the noise level x̂0 is re-noised to and valued at: a number in (0, 1) for every σ (0.15 chosen on
            validation prompts in session 19), or knots [[σ_1, σ_in_1], ...] (σ increasing, 0 < σ_in_k < σ_k) of a
            piecewise-linear σ_in(σ) through (0, 0), constant after the last knot (session 22: the level that ranks
            best grows with σ).
        guidance_scale: CFG weight of the denoiser (1.0 = conditional velocity only).
        seed: seed of the fixed re-noising ε (draw k of ``noise_draws`` from seed + k).
        noise_draws: K, the re-noisings of x̂0 whose values are averaged (>= 1).
    """

    dense = True

    def __init__(self, policy: nn.Module, critic: nn.Module, sigma_in: float | Sequence[Sequence[float]] = 0.15,
                 guidance_scale: float = 1.0, seed: int = 0, noise_draws: int = 1):
        super().__init__()
        self.knots = sigma_in_knots(sigma_in)
        if isinstance(noise_draws, bool) or not isinstance(noise_draws, int) or noise_draws < 1:
            raise ValueError(f"noise_draws must be an integer >= 1 (the re-noisings of x̂0 averaged), got "
                             f"{noise_draws!r}")
        if not getattr(critic, "dense", False):
            raise ValueError("the critic must give values at sigma > 0 (dense): the terminal critic cannot be one")
        from critics.base import check_pairing

        check_pairing(critic, policy.latent_channels, policy.latent_size)
        self.policy, self.critic = policy, critic
        self.sigma_in = float(sigma_in) if self.knots is None else self.knots.tolist()
        self.guidance_scale, self.seed = guidance_scale, seed
        self.noise_draws = noise_draws
        self.latent_channels, self.latent_size = critic.latent_channels, critic.latent_size
        self._eps: dict[tuple, Tensor] = {}
        self._knots_on: dict[tuple, Tensor] = {}

    def noise(self, like: Tensor) -> Tensor:
        """The fixed ε (K, B, C, h, w) for latents like ``like`` (B, C, h, w): draw k from ``seed`` + k, on the CPU
        so that every device gets the same."""
        key = (tuple(like.shape), like.device, like.dtype)
        if key not in self._eps:
            draws = [torch.randn(like.shape, generator=torch.Generator().manual_seed(self.seed + k))
                     for k in range(self.noise_draws)]
            self._eps[key] = torch.stack(draws).to(like.device, like.dtype)
        return self._eps[key]

    def sigma_in_at(self, s: Tensor) -> Tensor:
        """σ_in (B,) for latents at noise levels s (B,)."""
        if self.knots is None:
            return torch.full_like(s, self.sigma_in)
        key = (s.device, s.dtype)
        if key not in self._knots_on:  # one copy per device, not one per call
            self._knots_on[key] = self.knots.to(s.device, s.dtype)
        knots = self._knots_on[key]
        x = torch.cat([knots.new_zeros(1), knots[:, 0]])
        y = torch.cat([knots.new_zeros(1), knots[:, 1]])
        right = torch.searchsorted(x, s.clamp(0, x[-1]).contiguous()).clamp(1, len(x) - 1)
        w = (s.clamp(0, x[-1]) - x[right - 1]) / (x[right] - x[right - 1])
        return (1 - w) * y[right - 1] + w * y[right]  # at a knot exactly its σ_in

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        """(B,) float32."""
        s = _sigma_batch(sigma, z_t)
        s_in = self.sigma_in_at(s)
        noisy = s > s_in
        if not bool(noisy.any()):
            return self.critic.value(z_t, s, prompts)
        if prompts is None or len(prompts) != z_t.shape[0]:
            raise ValueError(f"the denoiser needs one prompt per latent ({z_t.shape[0]}); got "
                             f"{None if prompts is None else len(prompts)}")
        x0 = denoise(self.policy, z_t, s, list(prompts), self.guidance_scale)
        # one σ_in: the Python number, as before knots existed (a low-precision copy of it would round, e.g. in bf16)
        level = self.sigma_in if self.knots is None else s_in.to(x0.dtype).view(1, -1, 1, 1, 1)
        z_in = (1 - level) * x0 + level * self.noise(x0)  # (K, B, C, h, w)
        z_in = torch.where(noisy.view(1, -1, 1, 1, 1), z_in, z_t.to(z_in.dtype))
        k = self.noise_draws
        v = self.critic.value(z_in.flatten(0, 1), torch.where(noisy, s_in, s).repeat(k), list(prompts) * k)
        return v.view(k, -1).mean(0)

    def forward(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        return self.value(z_t, sigma, prompts)
