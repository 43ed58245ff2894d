"""A critic on the policy's denoised estimate (ours, session 19): the StitchVM fed Tweedie's latent, not z_t.

    x̂0 = z_t − σ v_θ(z_t, σ | c)                  (Tweedie's one-step posterior mean, the policy's CFG velocity)
    ẑ  = (1 − σ_in) x̂0 + σ_in ε,  ε fixed          (re-noised to the level the critic ranks best at)
    V(z_t) = C(ẑ, σ_in)                            C: a StitchVM, the low-σ expert

Why (docs/critic.md, session 19). The low-σ expert ranks near-clean latents well (ρ .93 against V_MC at σ 0.1)
but loses at σ 0.5 (.78-.80, Tweedie .84-.88): inside its frozen head it must do the denoising the whole DiT does
for Tweedie. Given x̂0 re-noised to σ_in 0.15 it ranks the σ-0.5 latents at .847 / .889 and the σ-0.25 ones at
.931 / .936 (validation / test prompts, CPU), with no VAE decode and no pixel reward: one policy velocity (two DiT
passes with CFG) and one critic pass, ~0.4x Tweedie's cost on CPU. In a trainer that samples, v_θ(z_t) is the
step's own velocity. Above σ ~0.5, x̂0 is a blur the expert was never trained on (.50 at σ 0.75 against the uniform
expert's .61): route those σ to a critic on z_t (``critics.load.stitchvm_experts_denoised``).

ε is drawn once per latent shape from ``seed``, so V is a deterministic function of z_t (steering differentiates
it; the trainers' advantages compare values of one call). Latents already at σ ≤ σ_in are valued as they are.
Differentiable in z_t through the critic and the policy's velocity, as Tweedie is through the decoder.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from critics.baselines import _sigma_batch, denoise


class DenoisedCritic(nn.Module):
    """V(z_t) = critic((1 − σ_in)(z_t − σ v_θ) + σ_in ε, σ_in); z_t itself where σ ≤ σ_in.

    Args:
        policy: the flow policy whose velocity gives x̂0 (its active LoRA adapter).
        critic: a dense critic of the policy's latent space (a StitchVM; the low-σ expert).
        sigma_in: the noise level x̂0 is re-noised to and valued at, in (0, 1) (0.15: chosen on validation prompts).
        guidance_scale: CFG weight of the denoiser (1.0 = conditional velocity only).
        seed: seed of the fixed re-noising ε.
    """

    dense = True

    def __init__(self, policy: nn.Module, critic: nn.Module, sigma_in: float = 0.15, guidance_scale: float = 1.0,
                 seed: int = 0):
        super().__init__()
        if not 0 < sigma_in < 1:
            raise ValueError(f"sigma_in must be in (0, 1) (the noise level x̂0 is valued at), got {sigma_in}")
        if not getattr(critic, "dense", False):
            raise ValueError("the critic must give values at sigma > 0 (dense): the terminal critic cannot be one")
        from critics.base import check_pairing

        check_pairing(critic, policy.latent_channels, policy.latent_size)
        self.policy, self.critic = policy, critic
        self.sigma_in, self.guidance_scale, self.seed = float(sigma_in), guidance_scale, seed
        self.latent_channels, self.latent_size = critic.latent_channels, critic.latent_size
        self._eps: dict[tuple, Tensor] = {}

    def noise(self, like: Tensor) -> Tensor:
        """The fixed ε (B, C, h, w): one draw per shape from ``seed`` (on the CPU, so every device gets the same)."""
        key = (tuple(like.shape), like.device, like.dtype)
        if key not in self._eps:
            g = torch.Generator().manual_seed(self.seed)
            self._eps[key] = torch.randn(like.shape, generator=g).to(like.device, like.dtype)
        return self._eps[key]

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        """(B,) float32."""
        s = _sigma_batch(sigma, z_t)
        noisy = s > self.sigma_in
        if not bool(noisy.any()):
            return self.critic.value(z_t, s, prompts)
        if prompts is None or len(prompts) != z_t.shape[0]:
            raise ValueError(f"the denoiser needs one prompt per latent ({z_t.shape[0]}); got "
                             f"{None if prompts is None else len(prompts)}")
        x0 = denoise(self.policy, z_t, s, list(prompts), self.guidance_scale)
        z_in = (1 - self.sigma_in) * x0 + self.sigma_in * self.noise(x0)
        z_in = torch.where(noisy.view(-1, 1, 1, 1), z_in, z_t.to(z_in.dtype))
        return self.critic.value(z_in, torch.where(noisy, torch.full_like(s, self.sigma_in), s), prompts)

    def forward(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        return self.value(z_t, sigma, prompts)
