"""Baseline critics (terminal, tweedie, mc): analytic values, the rollouts they are made of, errors, pairing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from critics.base import Critic, check_pairing
from critics.baselines import MonteCarloCritic, TerminalCritic, TweedieCritic
from policies import samplers
from policies.testing import tiny_policy

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red square"]


class BrightnessReward(nn.Module):
    """r(x, c) = mean pixel value × (1 + len(c) mod 3): differentiable, prompt-dependent, float32 (B,)."""

    differentiable = True

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        weight = torch.tensor([1.0 + len(p) % 3 for p in prompts], dtype=images.dtype)
        return (images.mean((1, 2, 3)) * weight).float()


def latents(n: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_terminal_scores_finished_samples_only():
    policy, reward = tiny_policy(), BrightnessReward()
    critic = TerminalCritic(policy, reward)
    z = latents()
    with torch.no_grad():
        torch.testing.assert_close(critic.value(z, 0.0, PROMPTS), reward(policy.decode(z), PROMPTS))
    assert isinstance(critic, Critic) and not critic.dense
    with pytest.raises(ValueError, match="terminal critic scores finished samples only"):
        critic.value(z, torch.tensor([0.0, 0.3, 0.0]), PROMPTS)


def test_tweedie_is_exact_for_a_point_mass_posterior():
    """If the data is one latent z0, the ideal velocity is v(z, σ) = (z − z0) / σ: z − σ v = z0 at every σ."""
    policy, reward = tiny_policy(), BrightnessReward()
    z0 = latents(seed=1)
    policy.velocity = lambda z, sigma, cond, guidance_scale=1.0: (z - z0) / sigma.view(-1, 1, 1, 1)
    critic = TweedieCritic(policy, reward)
    eps = latents(seed=2)
    sigma = torch.tensor([0.1, 0.5, 0.95])
    z_t = (1 - sigma.view(-1, 1, 1, 1)) * z0 + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        torch.testing.assert_close(critic.denoise(z_t, sigma, PROMPTS), z0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(critic.value(z_t, sigma, PROMPTS), reward(policy.decode(z0), PROMPTS),
                                   rtol=1e-5, atol=1e-6)


def test_tweedie_gradient_flows_through_the_denoiser():
    """Linear velocity v = a z: z_hat_0 = (1 − σ a) z, so ∇_z V = (1 − σ a) ∇_x r(D(x)) at x = z_hat_0."""
    policy, reward = tiny_policy(), BrightnessReward()
    a, sigma = 0.8, 0.6
    policy.velocity = lambda z, s, cond, guidance_scale=1.0: a * z
    critic = TweedieCritic(policy, reward, guidance_scale=2.0)
    z = latents(2).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic.value(z, sigma, PROMPTS[:2]).sum(), z)
    x = ((1 - sigma * a) * z).detach().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(reward(policy.decode(x), PROMPTS[:2]).sum(), x)
    torch.testing.assert_close(grad, (1 - sigma * a) * grad_x)
    assert grad.abs().sum() > 0


def test_mc_value_is_the_mean_of_its_sde_rollouts():
    policy, reward = tiny_policy(), BrightnessReward()
    k, sigma = 4, 0.6
    critic = MonteCarloCritic(policy, reward, num_rollouts=k, num_steps=6, eta=0.7, guidance_scale=1.5, seed=3)
    z = latents(2)
    with torch.no_grad():
        value = critic.value(z, sigma, PROMPTS[:2])
        schedule = critic.schedule_from(sigma, z.device)
        traj = samplers.sample(policy.velocity_fn(policy.encode_prompts(PROMPTS[:2]).repeat(k), 1.5),
                               z.repeat_interleave(k, 0), schedule, eta=0.7,
                               generator=torch.Generator().manual_seed(3))
        rewards = reward(policy.decode(traj.z_tau), [p for p in PROMPTS[:2] for _ in range(k)]).view(2, k)
    torch.testing.assert_close(value, rewards.mean(1))
    assert rewards.std(1).min() > 0  # the K rollouts differ (SDE), so this is an average, not one sample
    full = policy.sigmas(6, "cpu")
    torch.testing.assert_close(schedule, torch.cat([torch.tensor([sigma]), full[full < sigma]]))
    assert schedule[-1] == 0
    with torch.no_grad():
        assert torch.equal(critic.value(z, sigma, PROMPTS[:2]), value)  # reproducible
        other = MonteCarloCritic(policy, reward, num_rollouts=k, num_steps=6, guidance_scale=1.5, seed=4)
        assert not torch.equal(other.value(z, sigma, PROMPTS[:2]), value)


def test_mc_at_sigma_zero_is_the_terminal_reward_and_mixed_batches_work():
    policy, reward = tiny_policy(), BrightnessReward()
    critic = MonteCarloCritic(policy, reward, num_rollouts=2, num_steps=4)
    z = latents()
    sigma = torch.tensor([0.0, 0.5, 0.0])
    with torch.no_grad():
        value = critic.value(z, sigma, PROMPTS)
        terminal = TerminalCritic(policy, reward).value(z, 0.0, PROMPTS)
    torch.testing.assert_close(value[[0, 2]], terminal[[0, 2]])
    assert not torch.isclose(value[1], terminal[1])
    with pytest.raises(ValueError, match="num_rollouts must be >= 1"):
        MonteCarloCritic(policy, reward, num_rollouts=0)
    with pytest.raises(ValueError, match=r"sigma must be a float or shape \(3,\)"):
        critic.value(z, torch.tensor([0.5, 0.5]), PROMPTS)


def test_pairing_check_names_both_latent_spaces():
    critic = TweedieCritic(tiny_policy(), BrightnessReward())
    check_pairing(critic, 4, 8)
    with pytest.raises(ValueError, match=r"works on latents \(4, 8, 8\) but the policy produces \(16, 64, 64\)"):
        check_pairing(critic, 16, 64)
