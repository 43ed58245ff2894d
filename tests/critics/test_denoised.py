"""The critic on the policy's denoised estimate (critics/denoised.py): its value is the wrapped critic's on the
re-noised Tweedie latent, computed by hand; latents at or below sigma_in pass through; gradients reach z_t; the
shipped config routes as stitchvm_experts does; bad settings are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from critics.baselines import TweedieCritic
from critics.denoised import DenoisedCritic
from rl import train
from rl.config import instantiate, load_yaml
from shapes.models import load_shapes_policy, load_shapes_reward


class Planted(nn.Module):
    """V = 3 * mean(z) + 10 * sigma: a known value with a known gradient."""

    dense, latent_channels, latent_size = True, 4, 16

    def __init__(self):
        super().__init__()
        self.seen = []

    def value(self, z_t, sigma, prompts=None):
        s = torch.as_tensor(sigma, dtype=torch.float32).expand(z_t.shape[0])
        self.seen.append((z_t.detach().clone(), s.clone()))
        return 3 * z_t.float().flatten(1).mean(1) + 10 * s


@pytest.fixture(scope="module")
def policy():
    return load_shapes_policy().eval().requires_grad_(False)


def test_value_is_the_critics_on_the_renoised_tweedie_latent(policy):
    inner = Planted()
    critic = DenoisedCritic(policy, inner, sigma_in=0.1, guidance_scale=2.0, seed=3)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 0.05, 0.8])
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    v = critic.value(z, sigma, prompts)
    x0 = TweedieCritic(policy, None, guidance_scale=2.0).denoise(z, sigma, prompts)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    expected_in = 0.9 * x0 + 0.1 * eps
    expected_in[1] = z[1]  # sigma 0.05 <= sigma_in: valued as it is, at its own sigma
    (z_in, s_in), = inner.seen
    torch.testing.assert_close(z_in, expected_in)
    torch.testing.assert_close(s_in, torch.tensor([0.1, 0.05, 0.1]))
    torch.testing.assert_close(v, 3 * expected_in.flatten(1).mean(1) + 10 * s_in)
    torch.testing.assert_close(critic.value(z, sigma, prompts), v)  # the same fixed noise every call


def test_noise_draws_average_the_values_of_several_renoisings(policy):
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 0.05, 0.8])
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    inner = Planted()
    v = DenoisedCritic(policy, inner, sigma_in=0.1, guidance_scale=2.0, seed=3, noise_draws=3).value(z, sigma, prompts)
    x0 = TweedieCritic(policy, None, guidance_scale=2.0).denoise(z, sigma, prompts)
    values = []
    for k in range(3):  # draw k from seed + k
        z_in = 0.9 * x0 + 0.1 * torch.randn(z.shape, generator=torch.Generator().manual_seed(3 + k))
        z_in[1] = z[1]  # at or below sigma_in: valued as it is, in every draw
        values.append(3 * z_in.flatten(1).mean(1) + 10 * torch.tensor([0.1, 0.05, 0.1]))
    torch.testing.assert_close(v, torch.stack(values).mean(0))
    (z_in, s_in), = inner.seen  # one critic pass over the K * B re-noisings
    assert z_in.shape == (9, 4, 16, 16) and s_in.shape == (9,)
    one = DenoisedCritic(policy, Planted(), sigma_in=0.1, guidance_scale=2.0, seed=3).value(z, sigma, prompts)
    torch.testing.assert_close(one, values[0])  # draw 0 is the single-draw critic's
    assert not torch.allclose(v[0], one[0])


def test_a_sigma_in_schedule_is_piecewise_linear_through_its_knots(policy):
    knots = [[0.1, 0.05], [0.25, 0.1], [0.5, 0.15]]
    critic = DenoisedCritic(policy, Planted(), sigma_in=knots)
    s = torch.tensor([0.02, 0.1, 0.175, 0.25, 0.4, 0.5, 0.9])
    torch.testing.assert_close(critic.sigma_in_at(s), torch.tensor([0.01, 0.05, 0.075, 0.1, 0.13, 0.15, 0.15]))
    # every latent is valued at its own sigma_in: the value of one batch is each latent's value on its own
    inner = Planted()
    critic = DenoisedCritic(policy, inner, sigma_in=knots, guidance_scale=2.0, seed=3)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma, prompts = torch.tensor([0.1, 0.25, 0.4]), ["a red circle", "two blue squares", "a green triangle"]
    v = critic.value(z, sigma, prompts)
    x0 = TweedieCritic(policy, None, guidance_scale=2.0).denoise(z, sigma, prompts)
    level = torch.tensor([0.05, 0.1, 0.13]).view(-1, 1, 1, 1)
    expected_in = (1 - level) * x0 + level * torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    (z_in, s_in), = inner.seen
    torch.testing.assert_close(z_in, expected_in)
    torch.testing.assert_close(s_in, level.flatten())
    torch.testing.assert_close(v, 3 * expected_in.flatten(1).mean(1) + 10 * level.flatten())
    for bad in ([], [[0.1, 0.2]], [[0.25, 0.1], [0.1, 0.05]], [[0.1, 0.05, 1]], [[0.5, 0.0]], "0.1"):
        with pytest.raises(ValueError, match="knots"):
            DenoisedCritic(policy, Planted(), sigma_in=bad)
    for scalar in (np.float32(0.1), torch.tensor(0.1)):  # numbers of other types are one sigma_in too
        assert DenoisedCritic(policy, Planted(), sigma_in=scalar).knots is None


def test_latents_at_or_below_sigma_in_skip_the_denoiser(policy, monkeypatch):
    critic = DenoisedCritic(policy, Planted(), sigma_in=0.2)
    monkeypatch.setattr(policy, "velocity", lambda *a, **k: pytest.fail("no denoising below sigma_in"))
    z = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(critic.value(z, 0.2, ["a", "b"]), 3 * z.flatten(1).mean(1) + 2.0)


def test_the_gradient_reaches_z_through_the_denoiser(policy):
    critic = DenoisedCritic(policy, Planted(), sigma_in=0.1)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    critic.value(z, 0.6, ["a red circle", "a blue square"]).sum().backward()
    assert torch.isfinite(z.grad).all()
    # d/dz of 3 * mean(0.9 * (z - 0.6 v(z))): without the velocity's Jacobian it would be the constant 2.7 / numel
    assert not torch.allclose(z.grad, torch.full_like(z.grad, 2.7 / z[0].numel()))


def test_bad_settings_are_clear_errors(policy):
    with pytest.raises(ValueError, match="sigma_in must be in"):
        DenoisedCritic(policy, Planted(), sigma_in=0.0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="noise_draws must be an integer >= 1"):
            DenoisedCritic(policy, Planted(), noise_draws=bad)
    sparse = Planted()
    sparse.dense = False
    with pytest.raises(ValueError, match="dense"):
        DenoisedCritic(policy, sparse)
    other = Planted()
    other.latent_size = 8
    with pytest.raises(ValueError, match="build or load a critic for this policy"):
        DenoisedCritic(policy, other)
    with pytest.raises(ValueError, match="one prompt per latent"):
        DenoisedCritic(policy, Planted()).value(torch.zeros(2, 4, 16, 16), 0.5, ["only one"])


def test_shipped_config_denoises_for_the_low_expert_only(policy):
    from critics import load

    reward = load_shapes_reward()
    node = load_yaml(train.CONFIG_ROOT / "critic" / "stitchvm_experts_denoised.yaml")
    critic = instantiate(node, _path="critic", policy=policy, reward=reward)
    low, high = (load.stitchvm(policy, reward, p) for p in node["paths"])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two blue squares"]
    assert node["sigma_in"] == [[0.1, 0.05], [0.25, 0.1], [0.5, 0.15]] and node["noise_draws"] == 4
    with torch.no_grad():
        x0 = TweedieCritic(policy, reward, guidance_scale=1.0).denoise(z, 0.4, prompts)
        s_in = 0.1 + (0.4 - 0.25) / (0.5 - 0.25) * (0.15 - 0.1)  # between the knots at sigma 0.25 and 0.5: 0.13
        values = [low.value((1 - s_in) * x0 + s_in * torch.randn(z.shape, generator=torch.Generator().manual_seed(k)),
                            torch.tensor(s_in), prompts) for k in range(4)]
        torch.testing.assert_close(critic.value(z, 0.4, prompts), torch.stack(values).mean(0))
        torch.testing.assert_close(critic.value(z, 0.8, prompts), high.value(z, 0.8, prompts))
    with pytest.raises(ValueError, match="one flag per expert path"):
        load.stitchvm_experts_denoised(policy, reward, node["paths"], node["upper"], [True])



def test_the_value_benchmark_runs_it_at_its_own_guidance(monkeypatch):
    from critics import bench_value as bv
    from critics import load

    seen = {}
    real = load.stitchvm_experts_denoised

    def spy(policy, reward, **kw):
        seen.update(kw)
        return real(policy, reward, **kw)

    monkeypatch.setattr(load, "stitchvm_experts_denoised", spy)
    result = bv.main(["--quick", "--critics", "stitchvm_experts_denoised", "--retrieval-images", "0", "--out", ""])
    rows = result["value"]["rows"]
    assert all(-1 <= row["stitchvm_experts_denoised/rho"] <= 1 for row in rows.values())
    assert seen["guidance_scale"] == result["guidance_scale"] and seen["denoised"] == [True, False]
    assert seen["sigma_in"] == [[0.1, 0.05], [0.25, 0.1], [0.5, 0.15]] and seen["noise_draws"] == 4
