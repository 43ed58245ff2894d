"""Stateless sampler math for rectified-flow models (SD3 family), and the trajectory loop on top.

Conventions (see docs/design.md): sigma in [0, 1], sigma = 1 is pure noise, the forward path is
z_sigma = (1 - sigma) z_0 + sigma * eps and the model predicts the velocity v = eps - z_0. A step goes
sigma_i -> sigma_{i+1} with Delta = sigma_{i+1} - sigma_i < 0.

Notation (Flow-GRPO, arXiv 2505.05470, Eq. 9 and its reference implementation):

    symbol          here              meaning
    eta             ``eta``           noise level of the SDE (0 = deterministic Euler ODE)
    s_i             ``std_dev_t``     eta * sqrt(sigma_i / (1 - sigma_i)), the diffusion coefficient
    mu_i            ``mean``          mean of the Gaussian transition z_{i+1} | z_i
    s_i sqrt(-Delta) ``std``          standard deviation of that transition

The SDE dz = [v + s^2/(2 sigma) (z + (1 - sigma) v)] dsigma + s dw has the same marginals as the ODE
dz = v dsigma; its Euler-Maruyama step is a Gaussian, so a step's log-probability is exact and the same
function can both sample z_{i+1} and re-score a given z_{i+1} (rollout and training cannot drift apart).

Coefficients-preserving sampling (CPS; Wang & Yu, arXiv 2509.05952, the ``sde_type="cps"`` of Flow-GRPO's newer
configs): ``cps_step`` writes z_{i+1} on the forward path's own coefficients, from the step's predictions of the
data and of the noise, with a share of the noise redrawn:

    x0_hat = z_i - sigma_i v        eps_hat = z_i + (1 - sigma_i) v        c_i = sigma_{i+1} sin(eta pi / 2)
    z_{i+1} = (1 - sigma_{i+1}) x0_hat + sqrt(sigma_{i+1}^2 - c_i^2) eps_hat + c_i eps

so z_{i+1}'s noise has exactly the variance sigma_{i+1}^2 of the marginal it is meant to sit on, at any eta in
[0, 1] when the predictions are exact (the flow SDE's Euler-Maruyama step adds more at large eta and few steps).
eta = 0 is the Euler step, eta = 1 redraws all of the noise. The step into sigma = 0 is deterministic. Unlike the
flow SDE it is not marginal-preserving: x0_hat is a posterior mean, and each redrawn share of the noise replaces
spread that x0_hat does not carry, so samples are pulled toward the posterior mean as eta grows
(tests/policies/test_samplers.py measures it on an analytic flow). Its log-prob here is the Gaussian's, as for the
flow SDE; Flow-GRPO's CPS branch keeps only -(z_{i+1} - mu_i)^2, so its log-ratios are 2 c_i^2 times ours and its
CPS clip ranges (1e-5) do not carry over.

Log-prob reduction. ``sde_step`` returns the log-density *averaged* over latent elements by default, as
Flow-GRPO does. The mean keeps the magnitude of log-ratios independent of resolution, so the clip range
(1e-4) and KL weights transfer between 512^2 and 1024^2; the sum is the true log-density of the step
(``reduction="sum"``) and is what a likelihood-based estimator wants. The per-element log-density is
computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
SDEType = Literal["flow", "cps"]
SDE_TYPES: tuple[str, ...] = ("flow", "cps")


class StepOutput(NamedTuple):
    """One sampler step.

    Attributes:
        prev_sample: z_{i+1}, (B, C, h, w), in the dtype of the input latent.
        mean: mu_i, the mean of the transition, (B, C, h, w), float32.
        std: standard deviation of the transition, (B, 1, 1, 1), float32 (zero for the ODE step).
        log_prob: log pi(z_{i+1} | z_i), (B,) for "mean"/"sum" or (B, C, h, w) for "none"; None for eta = 0.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None


def _per_sample(x: Tensor | float, ref: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) sigma to (B, 1, 1, 1) float32 on ref's device."""
    x = torch.as_tensor(x, dtype=torch.float32, device=ref.device)
    if x.ndim == 0:
        x = x.expand(ref.shape[0])
    if x.shape != (ref.shape[0],):
        raise ValueError(f"sigma must be a float or have shape ({ref.shape[0]},), got {tuple(x.shape)}")
    return x.view(-1, *([1] * (ref.ndim - 1)))


def euler_step(v: Tensor, z: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Deterministic Euler step of dz = v dsigma, as FlowMatchEulerDiscreteScheduler.step.

    Upcasts to float32 (like diffusers) so bf16 models do not accumulate rounding over the trajectory.
    """
    dt = _per_sample(sigma_next, z) - _per_sample(sigma, z)
    return (z.float() + dt * v.float()).to(z.dtype)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: Reduction = "mean") -> Tensor:
    """log N(x; mean, std^2) per element, in float32, reduced over all non-batch dims."""
    x, mean, std = x.float(), mean.float(), std.float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    if reduction == "none":
        return log_prob
    dims = tuple(range(1, log_prob.ndim))
    return log_prob.mean(dim=dims) if reduction == "mean" else log_prob.sum(dim=dims)


def sde_std_dev(sigma: Tensor, eta: float, sigma_at_one: Tensor | float) -> Tensor:
    """s_i = eta * sqrt(sigma / (1 - sigma)); at sigma = 1 (where it diverges) Flow-GRPO uses the second
    sigma of the schedule in the denominator instead; ``sigma_at_one`` is that value."""
    denom = 1 - torch.where(sigma >= 1, torch.as_tensor(sigma_at_one, dtype=sigma.dtype, device=sigma.device), sigma)
    return eta * torch.sqrt(sigma / denom)


def sde_step(
    v: Tensor,
    z: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_at_one: Tensor | float | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Euler-Maruyama step of the marginal-preserving flow SDE, with the step's log-probability.

    mu_i = z_i (1 + s_i^2 Delta / (2 sigma_i)) + v (1 + s_i^2 (1 - sigma_i) / (2 sigma_i)) Delta
    z_{i+1} = mu_i + s_i sqrt(-Delta) eps

    Args:
        v: predicted velocity v_theta(z_i, sigma_i), (B, C, h, w).
        z: current latent z_i, (B, C, h, w).
        sigma, sigma_next: sigma_i and sigma_{i+1}, floats or (B,).
        eta: noise level; eta = 0 is exactly :func:`euler_step` and returns ``log_prob=None``.
        prev_sample: if given, z_{i+1} is not sampled but re-scored (training-time log-prob).
        generator: RNG for the noise eps.
        sigma_at_one: the value used in place of sigma in 1 - sigma when sigma = 1 (defaults to sigma_next).
        reduction: "mean" (default, Flow-GRPO), "sum" (true log-density) or "none" over latent elements.
    """
    if eta < 0:
        raise ValueError(f"eta (SDE noise level) must be >= 0, got {eta}")
    if v.shape != z.shape:
        raise ValueError(f"velocity shape {tuple(v.shape)} != latent shape {tuple(z.shape)}")
    sig = _per_sample(sigma, z)
    sig_next = _per_sample(sigma_next, z)
    dt = sig_next - sig  # Delta < 0
    if eta == 0:
        mean = z.float() + dt * v.float()
        return StepOutput(mean.to(z.dtype), mean, torch.zeros_like(sig), None)

    v32, z32 = v.float(), z.float()
    std_dev_t = sde_std_dev(sig, eta, sig_next if sigma_at_one is None else sigma_at_one)
    mean = z32 * (1 + std_dev_t**2 / (2 * sig) * dt) + v32 * (1 + std_dev_t**2 * (1 - sig) / (2 * sig)) * dt
    return _gaussian_transition(z, mean, std_dev_t * torch.sqrt(-dt), prev_sample, generator, reduction)


def _gaussian_transition(z: Tensor, mean: Tensor, std: Tensor, prev_sample: Tensor | None,
                         generator: torch.Generator | None, reduction: Reduction) -> StepOutput:
    """Draw z_{i+1} ~ N(mean, std^2) (or take the given one, re-scoring) and its log-prob."""
    if prev_sample is None:
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(z.dtype)
    elif prev_sample.shape != z.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != latent shape {tuple(z.shape)}")
    # z_{i+1} is data for the log-prob: gradients flow through mu_i (the policy), never through the sample.
    return StepOutput(prev_sample, mean, std, gaussian_log_prob(prev_sample.detach(), mean, std, reduction))


def cps_step(
    v: Tensor,
    z: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Coefficients-preserving step (module docstring), with the step's log-probability.

    Args as :func:`sde_step`; eta in [0, 1]. eta = 0, or a float sigma_next = 0 (c_i = 0), is exactly
    :func:`euler_step` and returns ``log_prob=None``. A tensor sigma_next must be > 0 in every row when eta > 0 (the
    step into sigma 0 has no log-prob; :func:`sample` makes it an ODE step): it is not checked, since reading it on
    the host would make every re-scoring wait for the GPU.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta (CPS noise level) must be in [0, 1] (c = sigma_next sin(eta pi / 2)), got {eta}")
    if v.shape != z.shape:
        raise ValueError(f"velocity shape {tuple(v.shape)} != latent shape {tuple(z.shape)}")
    sig, sig_next = _per_sample(sigma, z), _per_sample(sigma_next, z)
    c = sig_next * math.sin(eta * math.pi / 2)  # (B, 1, 1, 1)
    if eta == 0 or (isinstance(sigma_next, (int, float)) and sigma_next == 0):
        mean = z.float() + (sig_next - sig) * v.float()
        return StepOutput(mean.to(z.dtype), mean, torch.zeros_like(sig), None)
    v32, z32 = v.float(), z.float()
    x0_hat, eps_hat = z32 - sig * v32, z32 + (1 - sig) * v32
    mean = (1 - sig_next) * x0_hat + torch.sqrt((sig_next**2 - c**2).clamp_min(0)) * eps_hat
    return _gaussian_transition(z, mean, c, prev_sample, generator, reduction)


def stochastic_step(sde_type: SDEType, v: Tensor, z: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
                    eta: float, prev_sample: Tensor | None = None, generator: torch.Generator | None = None,
                    sigma_at_one: Tensor | float | None = None, reduction: Reduction = "mean") -> StepOutput:
    """:func:`sde_step` (``"flow"``, Flow-GRPO's SDE) or :func:`cps_step` (``"cps"``); the same arguments."""
    if sde_type == "flow":
        return sde_step(v, z, sigma, sigma_next, eta, prev_sample, generator, sigma_at_one, reduction)
    if sde_type == "cps":
        return cps_step(v, z, sigma, sigma_next, eta, prev_sample, generator, reduction)
    raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")


@dataclass
class Trajectory:
    """A sampled trajectory z_T -> ... -> z_tau.

    Attributes:
        latents: (B, K+1, C, h, w), z at every visited sigma, z_T first, z_tau last.
        sigmas: (K+1,) the sigmas visited (sigmas[k] belongs to latents[:, k]).
        log_probs: (B, K) per-step log-probs (zeros where a step was deterministic).
        tau: number of steps taken (K); equals the schedule length unless stopped early.
        sde_mask: (K,) bool, True where the step was stochastic.
    """

    latents: Tensor
    sigmas: Tensor
    log_probs: Tensor
    tau: int
    sde_mask: Tensor

    @property
    def z_tau(self) -> Tensor:
        """The last latent, (B, C, h, w)."""
        return self.latents[:, -1]

    @property
    def sigma_tau(self) -> float:
        return float(self.sigmas[-1])


VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""v(z (B,C,h,w), sigma (B,)) -> velocity (B,C,h,w); closes over prompts and guidance."""


def sample(
    velocity_fn: VelocityFn,
    z_T: Tensor,
    sigmas: Tensor,
    eta: float = 0.0,
    sde_steps: range | list[int] | None = None,
    stop_at: int | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
    keep_latents: bool = True,
    sde_type: SDEType = "flow",
) -> Trajectory:
    """Integrate from z_T along ``sigmas`` with Euler (ODE) or Euler-Maruyama (SDE) steps.

    Args:
        velocity_fn: v(z, sigma) with CFG etc. already applied.
        z_T: initial noise, (B, C, h, w).
        sigmas: (N+1,) decreasing schedule ending at 0 (as ``FlowMatchEulerDiscreteScheduler.sigmas``).
        eta: SDE noise level used on the steps in ``sde_steps`` (all steps if None); 0 = ODE everywhere.
        sde_steps: indices of the stochastic steps (Flow-GRPO-Fast's SDE window); others are ODE steps.
        stop_at: tau, stop after this many steps (0 < tau <= N) and return z_tau without finishing.
        generator: RNG for the SDE noise.
        reduction: log-prob reduction, see :func:`sde_step`.
        keep_latents: keep every intermediate latent (else only z_T and z_tau).
        sde_type: the stochastic steps' kind, "flow" (:func:`sde_step`) or "cps" (:func:`cps_step`; its step into
            sigma = 0 is deterministic and so is not marked stochastic).
    """
    num_steps = sigmas.numel() - 1
    tau = num_steps if stop_at is None else int(stop_at)
    if not 0 < tau <= num_steps:
        raise ValueError(f"stop_at (tau) must be in 1..{num_steps} for a {num_steps}-step schedule, got {stop_at}")
    sde_set = set(range(num_steps)) if sde_steps is None else set(sde_steps)
    if eta > 0 and sde_set and max(sde_set) >= num_steps:
        raise ValueError(f"sde_steps must index steps 0..{num_steps - 1}, got {sorted(sde_set)}")
    sigma_at_one = sigmas[1] if num_steps > 0 else None
    # CPS: the step into sigma 0 (the schedule's last, if it ends at 0) is deterministic; read once, not per step
    cps_last = num_steps - 1 if sde_type == "cps" and num_steps > 0 and float(sigmas[-1]) == 0 else None
    z = z_T
    latents, log_probs, mask = [z], [], []
    for i in range(tau):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sig_b = sigma.expand(z.shape[0]).to(z.device)
        v = velocity_fn(z, sig_b)
        stochastic = eta > 0 and i in sde_set and i != cps_last
        out = stochastic_step(sde_type, v, z, sigma, sigma_next, eta if stochastic else 0.0, generator=generator,
                              sigma_at_one=sigma_at_one, reduction=reduction)
        z = out.prev_sample
        log_probs.append(out.log_prob if out.log_prob is not None else torch.zeros(z.shape[0], device=z.device))
        mask.append(stochastic)
        if keep_latents or i == tau - 1:
            latents.append(z)
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        sigmas=sigmas[: tau + 1].clone() if keep_latents else sigmas[[0, tau]].clone(),
        log_probs=torch.stack(log_probs, dim=1),
        tau=tau,
        sde_mask=torch.tensor(mask, dtype=torch.bool),
    )
