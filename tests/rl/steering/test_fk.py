"""FK steering: hand-checked ESS and resampling, log-space weights for extreme potentials, potentials' final
correction, proposal scaling keeps argmax V, and N = M = 1 is plain SDE sampling."""

import math

import pytest
import torch

from policies import samplers
from policies.flow import PromptEmbeds
from rl.config import ConfigError
from rl.steering.fk import (FKConfig, Potentials, effective_sample_size, fk_sample, normalized_weights,
                            resample_indices)
from rl.steering.guides import CriticGuide, GuideOutput, SharedHeadGuide
from rl.steering.testing import tiny_world

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def world():
    return tiny_world()


# ---- weights, ESS, resampling -----------------------------------------------------------------------------------
def test_ess_hand_checked():
    # w = (1, 1, 2): ESS = (1 + 1 + 2)^2 / (1 + 1 + 4) = 16 / 6
    log_w = torch.log(torch.tensor([[1.0, 1.0, 2.0], [3.0, 3.0, 3.0]])) + torch.tensor([[5.0], [-7.0]])  # shift-free
    torch.testing.assert_close(effective_sample_size(log_w), torch.tensor([16 / 6, 3.0]))
    torch.testing.assert_close(normalized_weights(log_w)[0], torch.tensor([0.25, 0.25, 0.5]))


def test_weights_normalised_and_finite_for_extreme_potentials():
    log_w = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, 1e4, 1e4]])
    w = normalized_weights(log_w)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    top = 1 / (1 + math.exp(-1))  # log-weights 1e4 and 1e4 - 1: the rest vanish
    torch.testing.assert_close(w[0], torch.tensor([top, 0.0, 0.0, 1 - top]))
    ess = effective_sample_size(log_w)
    assert torch.isfinite(ess).all() and ((ess >= 1 - 1e-5) & (ess <= 4 + 1e-4)).all()
    torch.testing.assert_close(ess[1:], torch.tensor([4.0, 4.0]))
    for scheme in ("systematic", "multinomial"):
        idx = resample_indices(log_w, scheme, torch.Generator().manual_seed(0))
        assert idx.shape == (3, 4) and set(idx[0].tolist()) <= {0, 3}


def test_potentials_accumulate_and_stay_finite_at_extremes():
    pots = Potentials("sum", lam=1e3, num=2, device=torch.device("cpu"))
    log_w = torch.zeros(1, 2)
    for v in (torch.tensor([10.0, -10.0]),) * 3:
        log_w = log_w + pots.step(v).view(1, 2)  # log G reaches +-6e4
    assert torch.isfinite(normalized_weights(log_w)).all() and torch.isfinite(effective_sample_size(log_w)).all()


def test_systematic_resampling_counts_are_floor_or_ceil():
    log_w = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0]]))
    for seed in range(20):
        idx = resample_indices(log_w, "systematic", torch.Generator().manual_seed(seed))[0]
        assert torch.bincount(idx, minlength=4).tolist() == [2, 1, 1, 0]


@pytest.mark.parametrize("kind", ["difference", "max", "sum"])
def test_final_potential_makes_the_lineage_product_exp_lambda_v(kind):
    lam = 2.0
    pots = Potentials(kind, lam, num=3, device=torch.device("cpu"))
    total = torch.zeros(3)
    values = [torch.tensor([0.1, 0.5, -0.2]), torch.tensor([0.3, 0.2, 0.0]), torch.tensor([0.2, 0.9, 0.4])]
    for v in values:
        log_g = pots.step(v)
        total += log_g
    expected_last = {"difference": lam * (values[-1] - values[-2]),
                     "max": lam * torch.stack(values).max(0).values,
                     "sum": lam * torch.stack(values).sum(0)}[kind]
    torch.testing.assert_close(log_g, expected_last)
    v_final = torch.tensor([1.0, -1.0, 0.5])
    torch.testing.assert_close(total + pots.final(v_final), lam * v_final)


def test_difference_potential_step_values():
    pots = Potentials("difference", 3.0, num=2, device=torch.device("cpu"))
    torch.testing.assert_close(pots.step(torch.tensor([0.5, 1.0])), torch.tensor([1.5, 3.0]))  # V before = 0
    torch.testing.assert_close(pots.step(torch.tensor([0.25, 2.0])), torch.tensor([-0.75, 3.0]))
    pots = Potentials("max", 1.0, num=1, device=torch.device("cpu"))
    assert [pots.step(torch.tensor([v])).item() for v in (0.5, 0.25, 0.75)] == [0.5, 0.5, 0.75]


# ---- the sampler ------------------------------------------------------------------------------------------------
def test_fk_with_one_particle_is_plain_sde_sampling(world):
    policy = world.policy
    cond, sigmas = policy.encode_prompts(PROMPTS), policy.sigmas(6)
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    cfg = FKConfig(num_particles=1, num_proposals=1, eta=0.7, lam=100.0)
    with torch.no_grad():
        ref = samplers.sample(policy.velocity_fn(cond, 4.5), z_T, sigmas, eta=0.7,
                              generator=torch.Generator().manual_seed(3), keep_latents=False).z_tau
    out = fk_sample(CriticGuide(policy, world.stitchvm, 4.5), z_T, sigmas, cond, PROMPTS, cfg,
                    torch.Generator().manual_seed(3))
    assert torch.equal(out.z_0, ref)
    shared = fk_sample(SharedHeadGuide(policy, world.stitchvm, 4.5), z_T, sigmas, cond, PROMPTS, cfg,
                       torch.Generator().manual_seed(3))
    torch.testing.assert_close(shared.z_0, ref, rtol=1e-5, atol=1e-5)  # float32: batched vs split CFG rows
    assert out.num_resampled == 0


class MeanGuide:
    """Velocity 0 and V(z) = mean(z): lets a test predict FK's choices from the noise alone."""

    def __init__(self):
        self.value_calls = 0

    def __call__(self, z, sigma, cond, prompts, need_value=True, need_grad=False):
        self.value_calls += int(need_value)
        return GuideOutput(torch.zeros_like(z), z.flatten(1).mean(1) if need_value else None, None)

    def values(self, z, sigma, cond, prompts):
        return z.flatten(1).mean(1)


def test_proposal_scaling_keeps_the_argmax_value_proposal():
    sigmas = torch.tensor([0.8, 0.5, 0.0])
    z_T = torch.zeros(2, 1, 2, 2)  # 2 prompts x N = 1
    cond = PromptEmbeds(torch.zeros(2, 1, 1), torch.zeros(2, 1))
    cfg = FKConfig(num_particles=1, num_proposals=3, proposal_fraction=0.5, eta=0.7)
    guide = MeanGuide()
    out = fk_sample(guide, z_T, sigmas, cond, ["a", "b"], cfg, torch.Generator().manual_seed(0))
    # reproduce the first step's 3 proposals (same generator stream), keep the largest mean, then a plain step
    step = samplers.sde_step(torch.zeros(6, 1, 2, 2), torch.zeros(6, 1, 2, 2), sigmas[0], sigmas[1], 0.7,
                             generator=(g := torch.Generator().manual_seed(0)), sigma_at_one=sigmas[1])
    cand = step.prev_sample.view(3, 2, 1, 2, 2)
    z_1 = cand[cand.flatten(2).mean(2).argmax(0), torch.arange(2)]
    z_2 = samplers.sde_step(torch.zeros_like(z_1), z_1, sigmas[1], sigmas[2], 0.7, generator=g,
                            sigma_at_one=sigmas[1]).prev_sample
    torch.testing.assert_close(out.z_0, z_2)
    assert guide.value_calls == 0  # N = 1: no potentials; the proposals' V came from guide.values


def test_fk_resamples_and_selects(world):
    policy = world.policy
    cond, sigmas = policy.encode_prompts(PROMPTS), policy.sigmas(5)
    N = 4
    z_T = policy.noise(2 * N, torch.Generator().manual_seed(0))
    guide = SharedHeadGuide(policy, world.stitchvm, 4.5)
    cfg = FKConfig(num_particles=N, num_proposals=2, lam=1e4, ess_threshold=1.0, eta=0.7)  # resample every step
    out = fk_sample(guide, z_T, sigmas, cond, PROMPTS, cfg, torch.Generator().manual_seed(1))
    assert out.z_0.shape == (2, 4, 8, 8) and out.particles.shape == (2, N, 4, 8, 8)
    assert out.num_resampled == 2 * 5
    assert torch.isfinite(out.log_weights).all() and torch.isfinite(out.values).all()
    best = out.values.argmax(-1)
    torch.testing.assert_close(out.z_0, out.particles[torch.arange(2), best])
    torch.testing.assert_close(out.values, guide.values(out.particles.flatten(0, 1), torch.zeros(2 * N), cond.repeat(N),
                                                        [p for p in PROMPTS for _ in range(N)]).view(2, N))
    sampled = fk_sample(guide, z_T, sigmas, cond, PROMPTS, FKConfig(num_particles=N, select="sample", eta=0.7),
                        torch.Generator().manual_seed(1))
    assert sampled.z_0.shape == (2, 4, 8, 8)


def test_fk_config_checks():
    with pytest.raises(ConfigError, match="eta"):
        FKConfig(num_particles=4, eta=0.0)
    FKConfig(num_particles=1, num_proposals=1, eta=0.0)  # plain ODE sampling is allowed
    with pytest.raises(ValueError, match="potential"):
        Potentials("product", 1.0, 2, torch.device("cpu"))


def test_resampling_copies_the_heavy_particle_within_its_own_prompt():
    # velocity 0 and V = mean(z): with one far-ahead particle per prompt and a large lambda, the first resampling
    # replaces all four of a prompt's particles by copies of its own leader (row 1 for prompt 0, row 6 for prompt
    # 1), never by the other prompt's; the SDE noise (eta 0.1) then moves each copy by ~0.1
    z_T = torch.zeros(8, 1, 2, 2)
    z_T[1], z_T[6] = 10.0, 20.0
    cond = PromptEmbeds(torch.zeros(2, 1, 1), torch.zeros(2, 1))
    sigmas = torch.tensor([0.8, 0.5, 0.0])
    cfg = FKConfig(num_particles=4, num_proposals=1, lam=10.0, ess_threshold=1.0, eta=0.1)
    out = fk_sample(MeanGuide(), z_T, sigmas, cond, ["a", "b"], cfg, torch.Generator().manual_seed(0))
    assert out.num_resampled >= 1
    means = out.particles.flatten(2).mean(2)  # (2 prompts, 4 particles)
    torch.testing.assert_close(means, torch.tensor([[10.0] * 4, [20.0] * 4]), rtol=0, atol=1.0)
    # select="sample" draws z_0 among the final particles by weight: with one particle far ahead, that one
    far = torch.zeros(8, 1, 2, 2)
    far[2], far[5] = 10.0, 20.0
    sampled = fk_sample(MeanGuide(), far, sigmas, cond, ["a", "b"],
                        FKConfig(num_particles=4, num_proposals=1, lam=10.0, ess_threshold=0.0, eta=0.1,
                                 select="sample"), torch.Generator().manual_seed(0))
    assert sampled.num_resampled == 0
    torch.testing.assert_close(sampled.z_0, sampled.particles[torch.arange(2), torch.tensor([2, 1])])
