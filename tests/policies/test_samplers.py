"""Sampler math against analytic references and diffusers' own scheduler."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from policies import samplers
from policies.testing import tiny_policy


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

ANALYTIC_MU, ANALYTIC_STD = 0.7, 0.5  # data x0 ~ N(mu, s^2)


def _analytic_velocity(z, sigma):
    """The exact velocity E[eps - x0 | x_t] of x_t = (1 - t) x0 + t eps with x0 ~ N(ANALYTIC_MU, ANALYTIC_STD^2)."""
    mu, s = ANALYTIC_MU, ANALYTIC_STD
    t = torch.as_tensor(sigma, dtype=z.dtype).reshape(-1, 1, 1, 1)
    var = (1 - t) ** 2 * s**2 + t**2
    d = z - (1 - t) * mu
    return t / var * d - (mu + (1 - t) * s**2 / var * d)



def test_log_prob_equals_torch_normal():
    v, z = _rand(3, 4, 8, 8, seed=1), _rand(3, 4, 8, 8, seed=2)
    sigma, sigma_next = torch.tensor([0.8, 0.6, 0.4]), torch.tensor([0.7, 0.5, 0.3])
    out = samplers.sde_step(v, z, sigma, sigma_next, eta=0.7, generator=torch.Generator().manual_seed(3),
                            reduction="none")
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)
    mean_red = samplers.sde_step(v, z, sigma, sigma_next, 0.7, prev_sample=out.prev_sample).log_prob
    sum_red = samplers.sde_step(v, z, sigma, sigma_next, 0.7, prev_sample=out.prev_sample, reduction="sum").log_prob
    torch.testing.assert_close(mean_red, ref.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum_red, ref.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-3)


def test_sde_mean_and_std_match_flow_grpo_formula():
    v, z = _rand(1, 2, 4, 4, seed=4), _rand(1, 2, 4, 4, seed=5)
    sigma, sigma_next, eta = 0.6, 0.45, 0.7
    out = samplers.sde_step(v, z, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(0))
    s = eta * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = z * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(out.mean, mean, rtol=1e-6, atol=1e-6)
    assert out.std.flatten()[0].item() == pytest.approx(s * math.sqrt(-dt), rel=1e-6)


def test_sigma_one_uses_second_sigma_in_denominator():
    """At sigma = 1, sqrt(sigma / (1 - sigma)) diverges; Flow-GRPO substitutes sigma_1 in the denominator."""
    v, z = _rand(2, 2, 4, 4, seed=6), _rand(2, 2, 4, 4, seed=7)
    out = samplers.sde_step(v, z, 1.0, 0.8, eta=0.5, sigma_at_one=0.8)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_prob).all()
    assert out.std.flatten()[0].item() == pytest.approx(0.5 * math.sqrt(1 / 0.2) * math.sqrt(0.2), rel=1e-6)


def test_rescoring_reproduces_rollout_log_prob():
    v, z = _rand(2, 4, 8, 8, seed=8), _rand(2, 4, 8, 8, seed=9)
    out = samplers.sde_step(v, z, 0.7, 0.6, 1.0, generator=torch.Generator().manual_seed(0))
    again = samplers.sde_step(v, z, 0.7, 0.6, 1.0, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob, rtol=0, atol=0)


def test_eta_zero_is_euler_and_diffusers_step():
    v, z = _rand(2, 4, 8, 8, seed=10), _rand(2, 4, 8, 8, seed=11)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    i = 3
    ref = sched.step(v, sched.timesteps[i], z, return_dict=False)[0]
    ours = samplers.sde_step(v, z, sched.sigmas[i], sched.sigmas[i + 1], eta=0.0)
    torch.testing.assert_close(ours.prev_sample, ref, rtol=0, atol=1e-6)
    assert ours.log_prob is None
    torch.testing.assert_close(samplers.euler_step(v, z, sched.sigmas[i], sched.sigmas[i + 1]), ref, rtol=0, atol=1e-6)


def test_full_ode_trajectory_equals_diffusers_scheduler():
    policy = tiny_policy()
    cond = policy.encode_prompts(["a red circle", "two blue squares"])
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    sigmas = policy.sigmas(12)
    with torch.no_grad():
        traj = samplers.sample(policy.velocity_fn(cond, 3.0), z_T, sigmas)
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(12)
        z = z_T.clone()
        for k, t in enumerate(sched.timesteps):
            z = sched.step(policy.velocity(z, t / 1000, cond, 3.0), t, z, return_dict=False)[0]
            torch.testing.assert_close(traj.latents[:, k + 1], z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigmas, sched.sigmas.float(), rtol=0, atol=0)


def test_stop_at_tau_returns_prefix_of_full_trajectory():
    policy = tiny_policy()
    cond = policy.encode_prompts(["a red circle"] * 2)
    z_T = policy.noise(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = samplers.sample(policy.velocity_fn(cond), z_T, policy.sigmas(10), eta=0.7,
                               generator=torch.Generator().manual_seed(5))
        part = samplers.sample(policy.velocity_fn(cond), z_T, policy.sigmas(10), eta=0.7, stop_at=6,
                               generator=torch.Generator().manual_seed(5))
    assert part.tau == 6 and part.latents.shape == (2, 7, 4, 8, 8) and part.log_probs.shape == (2, 6)
    torch.testing.assert_close(part.latents, full.latents[:, :7])
    torch.testing.assert_close(part.log_probs, full.log_probs[:, :6])
    torch.testing.assert_close(part.z_tau, full.latents[:, 6])
    assert part.sigma_tau == pytest.approx(float(policy.sigmas(10)[6]))


def test_sde_window_only_stochastic_inside():
    policy = tiny_policy()
    cond = policy.encode_prompts(["a red circle"])
    z_T = policy.noise(1, torch.Generator().manual_seed(2))
    with torch.no_grad():
        traj = samplers.sample(policy.velocity_fn(cond), z_T, policy.sigmas(8), eta=0.7, sde_steps=range(2, 4))
    assert traj.sde_mask.tolist() == [False, False, True, True, False, False, False, False]
    assert (traj.log_probs[:, ~traj.sde_mask] == 0).all() and (traj.log_probs[:, traj.sde_mask] != 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop_at=0), "stop_at"), (dict(stop_at=11), "stop_at"), (dict(eta=0.5, sde_steps=[12]), "sde_steps")])
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        samplers.sample(lambda z, s: z, torch.zeros(1, 4, 8, 8), torch.linspace(1, 0, 11), **kwargs)


def test_negative_eta_rejected():
    with pytest.raises(ValueError, match="eta"):
        samplers.sde_step(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.5, 0.4, eta=-0.1)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sde_preserves_the_marginals_of_an_analytic_flow(eta):
    """Data x0 ~ N(mu, s^2), x_t = (1 - t) x0 + t eps: the exact velocity E[eps - x0 | x_t] is known in closed form.
    Sampling with it from N(0, 1) must end at N(mu, s^2) for the ODE and for the Flow-GRPO SDE alike (the SDE is
    marginal-preserving; Flow-GRPO's sigma = 1 substitute included) — up to discretisation at 200 steps."""
    mu, s = ANALYTIC_MU, ANALYTIC_STD
    velocity = _analytic_velocity

    sigmas = torch.linspace(1, 0, 201, dtype=torch.float64)
    z_T = torch.randn(40000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = samplers.sample(velocity, z_T, sigmas, eta=eta, generator=torch.Generator().manual_seed(1),
                        keep_latents=False).z_tau
    assert abs(x.mean().item() - mu) < 0.01  # standard error 0.0025
    assert abs(x.std().item() - s) < 0.015  # standard error 0.0018; Euler bias ~0.006 at 200 steps


def test_cps_step_keeps_the_forward_paths_coefficients():
    """z = (1 - sigma) x0 + sigma eps0 with the exact velocity v = eps0 - x0: the step's predictions are x0 and eps0
    themselves, so z' = (1 - sigma') x0 + sqrt(sigma'^2 - c^2) eps0 + c eps, c = sigma' sin(eta pi / 2): the noise
    keeps the variance sigma'^2 of the marginal at sigma' (Flow-CPS's point), and its log-prob is the Gaussian's."""
    x0, eps0 = _rand(4000, 2, 2, 2, seed=1), _rand(4000, 2, 2, 2, seed=2)
    sigma, sigma_next, eta = 0.8, 0.6, 0.8
    z, v = (1 - sigma) * x0 + sigma * eps0, eps0 - x0
    out = samplers.cps_step(v, z, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(3))
    c = sigma_next * math.sin(eta * math.pi / 2)
    torch.testing.assert_close(out.mean, (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - c**2) * eps0,
                               rtol=0, atol=1e-5)
    assert out.std.flatten()[0].item() == pytest.approx(c)
    noise = out.prev_sample - (1 - sigma_next) * x0  # sqrt(sigma'^2 - c^2) eps0 + c eps
    assert noise.var().item() == pytest.approx(sigma_next**2, rel=0.03)  # 32000 elements
    ref = torch.distributions.Normal(out.mean, c).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ref, rtol=0, atol=1e-5)
    again = samplers.cps_step(v, z, sigma, sigma_next, eta, prev_sample=out.prev_sample)  # re-scoring: ratio 1
    torch.testing.assert_close(again.log_prob, out.log_prob, rtol=0, atol=0)
    # the flow SDE's step at the same eta puts more than sigma'^2 of noise there (it preserves marginals only
    # in the limit of small steps)
    sde = samplers.sde_step(v, z, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(3))
    assert (sde.prev_sample - (1 - sigma_next) * x0).var().item() > 1.05 * sigma_next**2


def test_cps_limits_and_errors():
    z, v = _rand(3, 4, 2, 2, seed=4), _rand(3, 4, 2, 2, seed=5)
    zero = samplers.cps_step(v, z, 0.7, 0.4, 0.0)
    assert zero.log_prob is None
    torch.testing.assert_close(zero.prev_sample, samplers.euler_step(v, z, 0.7, 0.4))
    full = samplers.cps_step(v, z, 0.7, 0.4, 1.0)  # all of the noise redrawn: the mean is (1 - sigma') x0_hat
    torch.testing.assert_close(full.mean, 0.6 * (z - 0.7 * v))
    last = samplers.cps_step(v, z, 0.3, 0.0, 0.8)  # into sigma 0: deterministic, x0_hat
    assert last.log_prob is None and torch.allclose(last.prev_sample, z - 0.3 * v, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        samplers.cps_step(v, z, 0.7, 0.4, 1.3)
    with pytest.raises(ValueError, match="sde_type must be one of"):
        samplers.stochastic_step("ddim", v, z, 0.7, 0.4, 0.5)
    # a CPS trajectory: the step into sigma 0 is never marked stochastic, every other one is
    traj = samplers.sample(lambda x, s: torch.zeros_like(x), z, torch.tensor([1.0, 0.6, 0.3, 0.0]), eta=0.7,
                           sde_type="cps", generator=torch.Generator().manual_seed(0))
    assert traj.sde_mask.tolist() == [True, True, False] and (traj.log_probs[:, 2] == 0).all()


def test_cps_keeps_the_mean_and_pulls_the_spread_toward_the_posterior_mean():
    """The analytic flow above (x0 ~ N(0.7, 0.5^2), exact velocity), 10 steps as in RL rollouts. CPS is not
    marginal-preserving: it rebuilds z' from x0_hat = E[x0 | z], a posterior mean, so every redrawn share of the noise
    replaces spread that x0_hat does not carry. The mean stays; the final std falls with eta (measured: ODE .433,
    CPS eta 0.3 / 0.7 / 1.0: .419 / .371 / .309; the flow SDE at 0.7: .480)."""
    mu, s = ANALYTIC_MU, ANALYTIC_STD
    velocity = _analytic_velocity

    sigmas = torch.linspace(1, 0, 11, dtype=torch.float64)
    z_T = torch.randn(40000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stds = []
    for eta in (0.0, 0.3, 0.7, 1.0):
        x = samplers.sample(velocity, z_T, sigmas, eta=eta, generator=torch.Generator().manual_seed(1),
                            keep_latents=False, sde_type="cps").z_tau
        assert abs(x.mean().item() - mu) < 0.01
        stds.append(x.std().item())
    assert stds == sorted(stds, reverse=True) and stds[-1] < 0.33 and stds[0] > 0.42
