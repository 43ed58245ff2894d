"""DPS: the guided step is the unguided Flow-GRPO step plus (-Delta) lambda (s^2/2) g; a zero-gradient critic
reproduces unguided sampling bit for bit; guidance moves samples up the value."""

import math

import pytest
import torch

from policies import samplers
from rl.config import ConfigError
from rl.steering.dps import DPSConfig, dps_sample, dps_step, guidance_direction
from rl.steering.guides import CriticGuide, SharedHeadGuide
from rl.steering.testing import tiny_world

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def world():
    return tiny_world()


class ScaledCritic:
    """value = scale * inner.value: scale 0 gives a critic whose gradient is exactly zero (but is computed)."""

    dense, latent_channels, latent_size = True, 4, 8

    def __init__(self, inner, scale: float):
        self.inner, self.scale = inner, scale

    def value(self, z_t, sigma, prompts):
        return self.scale * self.inner.value(z_t, sigma, prompts)


class TargetCritic:
    """V(z) = -mean((z - c)^2): its gradient points at the constant latent c."""

    dense, latent_channels, latent_size = True, 4, 8

    def __init__(self, c: float):
        self.c = c

    def value(self, z_t, sigma, prompts):
        return -((z_t.float() - self.c) ** 2).flatten(1).mean(1)


def unguided(policy, z_T, sigmas, cond, eta, seed):
    with torch.no_grad():
        return samplers.sample(policy.velocity_fn(cond, 4.5), z_T, sigmas, eta=eta,
                               generator=torch.Generator().manual_seed(seed), keep_latents=False).z_tau


@pytest.mark.parametrize("ode,grad_norm", [(False, "none"), (False, "score"), (True, "score")])
def test_zero_gradient_critic_reproduces_unguided_sampling_exactly(world, ode, grad_norm):
    policy = world.policy
    cond, sigmas = policy.encode_prompts(PROMPTS), policy.sigmas(6)
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    cfg = DPSConfig(eta=0.7, guidance_scale=5.0, grad_norm=grad_norm, ode=ode)
    guide = CriticGuide(policy, ScaledCritic(world.stitchvm, 0.0), 4.5)
    out = dps_sample(guide, z_T, sigmas, cond, PROMPTS, cfg, torch.Generator().manual_seed(1))
    ref = unguided(policy, z_T, sigmas, cond, 0.0 if ode else 0.7, seed=1)
    assert torch.isfinite(out.values).all() and (out.grad_norms == 0).all()  # guided on every step, g = 0
    assert torch.equal(out.z_0, ref)


def test_guided_step_adds_the_eq40_displacement():
    """Paper constants (eta 2, lambda 1.5, raw gradient): z_{i+1} - z_{i+1}^unguided = (-Delta) 3 sigma/(1-sigma) g."""
    g = torch.Generator().manual_seed(0)
    z, v, grad = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma, sigma_next = 0.6, 0.55
    cfg = DPSConfig()
    assert (cfg.eta, cfg.guidance_scale, cfg.grad_norm) == (2.0, 1.5, "none")
    guided = dps_step(v, z, sigma, sigma_next, grad, cfg, torch.Generator().manual_seed(3))
    plain = dps_step(v, z, sigma, sigma_next, None, cfg, torch.Generator().manual_seed(3))
    expected = (sigma - sigma_next) * 3 * sigma / (1 - sigma) * grad
    torch.testing.assert_close(guided.prev_sample - plain.prev_sample, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided.std, plain.std)  # same noise scale: only the mean moves
    # the unguided step is samplers.sde_step itself
    ref = samplers.sde_step(v, z, sigma, sigma_next, 2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.prev_sample, ref.prev_sample)


def test_ode_variant_is_euler_plus_displacement():
    g = torch.Generator().manual_seed(1)
    z, v, grad = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    cfg = DPSConfig(eta=1.0, guidance_scale=2.0, ode=True)
    out = dps_step(v, z, 0.5, 0.4, grad, cfg)
    s2 = 1.0 * 0.5 / 0.5
    torch.testing.assert_close(out.prev_sample, z - 0.1 * v + 0.1 * 2.0 * s2 / 2 * grad, rtol=1e-5, atol=1e-6)
    assert out.log_prob is None


def test_score_normalisation_matches_score_norm_and_keeps_zero():
    g = torch.Generator().manual_seed(2)
    z, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    grad = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([1e-6, 1.0, 1e3]).view(3, 1, 1, 1)
    sigma = torch.full((3, 1, 1, 1), 0.3)
    out = guidance_direction(grad, v, z, sigma, "score")
    score_norm = ((z + 0.7 * v) / 0.3).flatten(1).norm(dim=1)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), score_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(out / out.flatten(1).norm(dim=1).view(3, 1, 1, 1),
                               grad / grad.flatten(1).norm(dim=1).view(3, 1, 1, 1))  # direction kept
    assert torch.equal(guidance_direction(torch.zeros_like(z), v, z, sigma, "score"), torch.zeros_like(z))


def test_guidance_moves_samples_towards_higher_value(world):
    policy = world.policy
    cond, sigmas = policy.encode_prompts(PROMPTS), policy.sigmas(8)
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    critic = TargetCritic(c=1.5)
    ref = unguided(policy, z_T, sigmas, cond, 0.7, seed=4)
    cfg = DPSConfig(eta=0.7, guidance_scale=0.5, grad_norm="score")
    out = dps_sample(CriticGuide(policy, critic, 4.5), z_T, sigmas, cond, PROMPTS, cfg,
                     torch.Generator().manual_seed(4))
    v_guided = critic.value(out.z_0, 0.0, PROMPTS)
    v_plain = critic.value(ref, 0.0, PROMPTS)
    assert (v_guided > v_plain + 0.1).all(), (v_guided, v_plain)


def test_shared_head_dps_equals_separate_dps():
    world = tiny_world(dtype=torch.float64)
    policy = world.policy
    cond, sigmas = policy.encode_prompts(PROMPTS), policy.sigmas(4)
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    cfg = DPSConfig(eta=0.7, guidance_scale=2.0, grad_norm="score", sigma_max=0.9)
    runs = [dps_sample(guide, z_T, sigmas, cond, PROMPTS, cfg, torch.Generator().manual_seed(5))
            for guide in (SharedHeadGuide(policy, world.stitchvm, 4.5), CriticGuide(policy, world.stitchvm, 4.5))]
    assert math.isnan(runs[0].values[0, 0])  # sigma_0 = 1 > sigma_max: unguided first step
    torch.testing.assert_close(runs[0].z_0, runs[1].z_0, rtol=1e-10, atol=1e-10)


def test_config_checks():
    with pytest.raises(ConfigError, match="eta"):
        DPSConfig(eta=0.0)
    with pytest.raises(ConfigError, match="sigma_min"):
        DPSConfig(sigma_min=0.8, sigma_max=0.5)
