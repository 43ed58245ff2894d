"""Value-guided sampling (DPS) with any critic's gradient ∇V: StitchVM paper App. A.2, Eq. 40.

The paper's guided SDE, in its time t = our sigma (1 = noise, integrated from 1 down to 0, dt < 0):

    dz = [u_t - (nu_t^2 / 2) ∇log p_t - lambda (nu_t^2 / 2) ∇V_t] dt + nu_t dW,   nu_t^2 = 4t / (1 - t)     (Eq. 40)

(the paper writes the coefficients as 2t/(1-t) and 3t/(1-t): nu^2/2 and lambda nu^2/2 with lambda = 1.5).
Here nu_t is Flow-GRPO's diffusion coefficient s_sigma = eta sqrt(sigma / (1 - sigma)) (policies/samplers.py), so
the paper is eta = 2, lambda = 1.5; u_t is the CFG velocity v; the rectified-flow score comes from the velocity:
eps_hat = z + (1 - sigma) v, ∇log p = -eps_hat / sigma.

One Euler-Maruyama step sigma_i -> sigma_{i+1}, Delta = sigma_{i+1} - sigma_i < 0, g = ∇V(z_i) (maybe normalised):

    z_{i+1} = mu_i + (-Delta) lambda (s_i^2 / 2) g + s_i sqrt(-Delta) xi                            (guided step)

where mu_i is exactly the mean of the unguided Flow-GRPO step ``samplers.sde_step``: guidance only adds a
displacement along g, of length proportional to the step size and to the noise injected at that step. It is
computed as the unguided step with an effective velocity v' = v + c g, c = -lambda (s_i^2/2) / kappa_i,
kappa_i = 1 + s_i^2 (1 - sigma_i) / (2 sigma_i) (the factor sde_step puts on v), so the same function, dtype
handling and noise draw are used: with g = 0 the guided sampler is the unguided one bit for bit.

ODE variant (``ode=True``): z_{i+1} = z_i + Delta v + (-Delta) lambda (s_i^2 / 2) g — the probability-flow Euler
step plus the same displacement (c = -lambda s_i^2 / 2, no noise); eta then only sets the guidance strength.

Gradient normalisation (``grad_norm``):
    "none"   g = ∇V, the paper. lambda is in units of the reward: a reward ten times larger needs lambda / 10.
    "score"  g = ∇V ||∇log p|| / ||∇V|| per sample (universal-guidance style rescaling to the score's norm).
             lambda is then the guidance pull relative to the prior's own Langevin pull (s^2/2) ∇log p — the same
             lambda works across rewards, resolutions and critics whose gradients differ by orders of magnitude
             (Tweedie's chain and StitchVM's differ). A zero gradient stays zero.

Gradients reach z only: the velocity and score are evaluated without gradients (the "DPS-lite" form used with
value models; differentiating through u_t is what Tweedie's chain does *inside* its V). Guidance is applied on
steps whose sigma_i lies in [sigma_min, sigma_max] (value models are least accurate near pure noise).

    symbol      here                  shape
    z_i         z                     (B, C, h, w)
    v           out.velocity          (B, C, h, w)   CFG velocity at z_i, no grad
    V, ∇V       out.value, out.grad   (B,), (B, C, h, w)
    s_i         sde_std_dev(...)      (B, 1, 1, 1)
    lambda      cfg.guidance_scale
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from policies import samplers
from policies.flow import PromptEmbeds
from rl.config import check, option
from rl.steering.guides import Guide

GradNorm = Literal["none", "score"]


@dataclass
class DPSConfig:
    """Guided-SDE hyper-parameters (defaults: the paper's Eq. 40).

    The paper's nu_t^2 = 4t/(1-t) diverges at t = 1: from sigma 1 (its first step taken at the schedule's second
    sigma, as Flow-GRPO) eta 2 multiplies z by ~-1 and adds noise of std ~2, and the latent's variance grows ~10x
    over the first two steps before the schedule pulls it back (at 20 and at 100 steps alike); the critic then
    guides on over-spread latents. configs/steer/dps.yaml runs eta 0.7 and guides below sigma 0.95."""

    eta: float = option(2.0, help="eta: s_sigma^2 = eta^2 sigma / (1 - sigma); the paper's nu_t^2 = 4t/(1-t) is 2")
    guidance_scale: float = option(1.5, help="lambda: the guidance drift is lambda (s^2/2) g; paper 3t/(1-t) = 1.5")
    grad_norm: GradNorm = option("none", help="'none' (paper: g = ∇V) or 'score' (g rescaled to ||∇log p||)")
    ode: bool = option(False, help="deterministic variant: Euler ODE step + the same guidance displacement")
    sigma_min: float = option(0.0, help="guide only steps whose sigma_i >= sigma_min")
    sigma_max: float = option(1.0, help="guide only steps whose sigma_i <= sigma_max")

    def __post_init__(self):
        check(self.eta > 0, "eta", f"must be > 0, got {self.eta}: the guidance drift lambda (s^2/2) g vanishes with "
                                   f"s^2 = eta^2 sigma / (1 - sigma); for a deterministic sampler set ode=true")
        check(self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        check(0 <= self.sigma_min <= self.sigma_max <= 1, "sigma_min", f"need 0 <= sigma_min <= sigma_max <= 1, got "
                                                                       f"({self.sigma_min}, {self.sigma_max})")

    def guides(self, sigma: float) -> bool:
        return self.guidance_scale > 0 and self.sigma_min <= sigma <= self.sigma_max


def _per_sample(x: Tensor | float, ref: Tensor) -> Tensor:
    """A float or (B,) to (B, 1, 1, 1) float32 on ref's device."""
    x = torch.as_tensor(x, dtype=torch.float32, device=ref.device)
    return (x.expand(ref.shape[0]) if x.ndim == 0 else x).view(-1, 1, 1, 1)


def guidance_direction(grad: Tensor, v: Tensor, z: Tensor, sigma: Tensor, grad_norm: GradNorm) -> Tensor:
    """g from ∇V: as is ("none") or rescaled per sample to the norm of the score -(z + (1 - sigma) v) / sigma.

    Args:
        grad: (B, C, h, w) ∇V.  v: CFG velocity.  z: latent.  sigma: (B, 1, 1, 1) float32.
    Returns:
        (B, C, h, w) float32.
    """
    grad = grad.float()
    if grad_norm == "none":
        return grad
    if grad_norm != "score":
        raise ValueError(f"grad_norm must be 'none' or 'score', got {grad_norm!r}")
    score = -(z.float() + (1 - sigma) * v.float()) / sigma  # ∇log p_sigma of rectified flow
    grad_norm_ = grad.flatten(1).norm(dim=1)
    # a zero gradient stays zero (dividing by a clamped norm would give 0 * inf = NaN)
    ratio = torch.where(grad_norm_ > 0, score.flatten(1).norm(dim=1) / grad_norm_.clamp_min(1e-30), 0.0)
    return grad * ratio.view(-1, 1, 1, 1)


def dps_step(v: Tensor, z: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, grad: Tensor | None,
             cfg: DPSConfig, generator: torch.Generator | None = None,
             sigma_at_one: Tensor | float | None = None) -> samplers.StepOutput:
    """One guided step (module docstring); ``grad=None`` is the unguided step of the same sampler.

    Args:
        v: (B, C, h, w) CFG velocity at z (no grad).  z: (B, C, h, w) z_i.
        sigma, sigma_next: sigma_i, sigma_{i+1} (floats or (B,)).
        grad: ∇V(z_i), (B, C, h, w), or None.
        sigma_at_one: stands in for sigma in 1 - sigma at sigma = 1 (default sigma_next, as ``sde_step``).
    Returns:
        samplers.StepOutput; its log_prob is that of the guided transition (None for the ODE variant).
    """
    eta = 0.0 if cfg.ode else cfg.eta
    sigma_at_one = sigma_next if sigma_at_one is None else sigma_at_one
    if grad is None:
        return samplers.sde_step(v, z, sigma, sigma_next, eta, generator=generator, sigma_at_one=sigma_at_one)
    sig = _per_sample(sigma, z)
    s2 = samplers.sde_std_dev(sig, cfg.eta, _per_sample(sigma_at_one, z)) ** 2  # s_i^2, (B, 1, 1, 1)
    g = guidance_direction(grad, v, z, sig, cfg.grad_norm)
    kappa = 1.0 if cfg.ode else 1 + s2 * (1 - sig) / (2 * sig)  # sde_step's factor on v
    v_eff = v.float() + (-cfg.guidance_scale * s2 / 2 / kappa) * g
    return samplers.sde_step(v_eff, z, sigma, sigma_next, eta, generator=generator, sigma_at_one=sigma_at_one)


class DPSResult(NamedTuple):
    """A guided sample.

    Attributes:
        z_0: (B, C, h, w) final latents.
        values: (B, K) float32 V(z_i) at each step (NaN on unguided steps).
        grad_norms: (B, K) float32 ||∇V(z_i)|| before normalisation (NaN on unguided steps).
    """

    z_0: Tensor
    values: Tensor
    grad_norms: Tensor


def dps_sample(guide: Guide, z_T: Tensor, sigmas: Tensor, cond: PromptEmbeds, prompts: Sequence[str], cfg: DPSConfig,
               generator: torch.Generator | None = None) -> DPSResult:
    """Integrate the guided SDE (or ODE variant) from z_T along ``sigmas``.

    Args:
        guide: gives the CFG velocity and V, ∇V at z (rl/steering/guides.py).
        z_T: (B, C, h, w) initial noise.
        sigmas: (K+1,) decreasing schedule ending at 0 (``policy.sigmas(K)``).
        cond: prompt embeddings, B rows.  prompts: B strings (the critic's text side).
        generator: RNG of the SDE noise.
    """
    if len(cond) != z_T.shape[0] or len(prompts) != z_T.shape[0]:
        raise ValueError(f"{len(cond)} embeddings and {len(prompts)} prompts for {z_T.shape[0]} latents")
    num_steps = sigmas.numel() - 1
    sigma_at_one = sigmas[1]
    steps = sigmas.tolist()  # host copy: per-step decisions without a device sync
    nan = torch.full((z_T.shape[0],), math.nan, device=z_T.device)
    values, grad_norms = [], []  # kept on the device until the end: no host sync inside the loop
    z = z_T
    for i in range(num_steps):
        guided = cfg.guides(steps[i])
        out = guide(z, sigmas[i].expand(z.shape[0]).to(z.device), cond, prompts, need_value=guided, need_grad=guided)
        values.append(out.value if guided else nan)
        grad_norms.append(out.grad.flatten(1).norm(dim=1).float() if guided else nan)
        z = dps_step(out.velocity, z, sigmas[i], sigmas[i + 1], out.grad if guided else None, cfg, generator,
                     sigma_at_one).prev_sample
    values, grad_norms = torch.stack(values, 1).cpu(), torch.stack(grad_norms, 1).cpu()  # (B, K)
    bad = [i for i in range(num_steps) if cfg.guides(steps[i]) and not torch.isfinite(grad_norms[:, i]).all()]
    if bad:
        raise FloatingPointError(f"non-finite value gradient at steps {bad} (sigma {steps[bad[0]]:.3f} first): check "
                                 f"the critic and the guidance scale")
    return DPSResult(z, values, grad_norms)
