"""Guides: the split MMDiT forward equals diffusers', and the fused (shared-head / shared-denoiser) guides give the
same velocity, value and gradient as running the critic on its own."""

import pytest
import torch

from critics.stitchvm import build_stitchvm
from policies.testing import tiny_transformer
from rl.steering import mmdit
from rl.steering.guides import CriticGuide, SharedHeadGuide, TweedieGuide, make_guide
from rl.steering.testing import random_stitchvm, tiny_world

PROMPTS = ["a red circle", "two blue squares to the left of a green star", "three yellow triangles"]
SIGMAS = [0.93, 0.5, 0.12]


@pytest.fixture(scope="module")
def world64():
    return tiny_world(dtype=torch.float64)


def inputs(policy, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(len(PROMPTS), 4, 8, 8, generator=g, dtype=torch.float32).to(dtype)
    return z, torch.tensor(SIGMAS), policy.encode_prompts(PROMPTS)


def test_split_forward_equals_transformer_forward_exactly():
    world = tiny_world()  # float32: bit-for-bit, same ops in the same order
    z, sigma, cond = inputs(world.policy, torch.float32)
    t = world.policy.transformer
    with torch.no_grad():
        ref = t(hidden_states=z, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                pooled_projections=cond.pooled, return_dict=False)[0]
        out = mmdit.forward(t, z, sigma, cond.embeds, cond.pooled)
        # cut after block 1, detach, resume: still the same numbers
        stream = mmdit.run_blocks(t, mmdit.embed(t, z, sigma, cond.embeds, cond.pooled), 0, 1).detach()
        resumed = mmdit.finish(t, mmdit.run_blocks(t, stream, 1, mmdit.num_blocks(t)), 8, 8)
    assert torch.equal(out, ref)
    assert torch.equal(resumed, ref)


@pytest.fixture(scope="module")
def prompt_critic(world64):
    """The world's StitchVM with a prompt-conditioned head (the conditional CFG half is its head)."""
    critic = random_stitchvm(world64.policy, world64.reward, i=1, seed=3, head_conditioning="prompt").double()
    critic.stitch.load_state_dict(world64.stitchvm.stitch.state_dict())  # the exercised G of the world's critic
    return critic


@pytest.mark.parametrize("head", ["null_text", "prompt"])
@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_shared_head_equals_separate_value_gradient_velocity(world64, prompt_critic, guidance_scale, head):
    policy = world64.policy
    critic = world64.stitchvm if head == "null_text" else prompt_critic
    assert SharedHeadGuide(policy, critic, guidance_scale).branch == ("uncond" if head == "null_text" else "cond")
    z, sigma, cond = inputs(policy)
    shared = SharedHeadGuide(policy, critic, guidance_scale)(z, sigma, cond, PROMPTS)
    separate = CriticGuide(policy, critic, guidance_scale)(z, sigma, cond, PROMPTS)
    with torch.no_grad():
        v_ref = policy.velocity(z, sigma, cond, guidance_scale)
    # the critic contract returns float32 values; the gradient and velocity stay float64
    torch.testing.assert_close(shared.value, separate.value, rtol=1e-6, atol=0)
    assert shared.grad.abs().max() > 1e-4  # a real gradient, not a vacuous comparison
    torch.testing.assert_close(shared.grad, separate.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(shared.velocity, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SharedHeadGuide(policy, critic, guidance_scale).values(z, sigma, cond, PROMPTS),
                               critic.value(z, sigma, PROMPTS).detach(), rtol=1e-6, atol=0)


def test_shared_head_matches_head_at_depth_two_and_j_two():
    """i = 2 = every block of the tiny DiT (the head ends at the context_pre_only block); j = 2 = a learned class
    token enters the tail (the Shapes critic's interface is (7, 4) of 8 blocks)."""
    world = tiny_world(dtype=torch.float64)
    probe = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    critic = random_stitchvm(world.policy, world.reward, i=2, j=2, probe_pixels=probe).double()
    z, sigma, cond = inputs(world.policy)
    shared = SharedHeadGuide(world.policy, critic, 3.0)(z, sigma, cond, PROMPTS)
    separate = CriticGuide(world.policy, critic, 3.0)(z, sigma, cond, PROMPTS)
    torch.testing.assert_close(shared.grad, separate.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(shared.velocity, separate.velocity, rtol=1e-12, atol=1e-12)


def test_tweedie_guide_equals_tweedie_critic(world64):
    policy = world64.policy
    z, sigma, cond = inputs(policy)
    fused = TweedieGuide(policy, world64.tweedie, 4.5)(z, sigma, cond, PROMPTS)
    separate = CriticGuide(policy, world64.tweedie, 4.5)(z, sigma, cond, PROMPTS)
    torch.testing.assert_close(fused.value, separate.value, rtol=1e-6, atol=0)
    assert fused.grad.abs().max() > 1e-4
    torch.testing.assert_close(fused.grad, separate.grad, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(fused.velocity, separate.velocity, rtol=1e-12, atol=1e-12)


def test_guided_call_leaves_no_parameter_gradients(world64):
    policy, critic = world64.policy, world64.stitchvm
    z, sigma, cond = inputs(policy)
    SharedHeadGuide(policy, critic, 4.5)(z, sigma, cond, PROMPTS)
    TweedieGuide(policy, world64.tweedie, 4.5)(z, sigma, cond, PROMPTS)
    modules = [policy.transformer, policy.vae, critic.stitch, critic.tail, world64.reward]
    assert all(p.grad is None for m in modules for p in m.parameters())


def test_shared_head_refuses_a_critic_on_another_transformer(world64):
    policy = world64.policy
    other = tiny_transformer(seed=0).double()  # same weights, other objects: the CFG pass would not be the head
    null = policy.null_embeds()
    W = torch.zeros(world64.stitchvm.tail.width, 16)
    critic = build_stitchvm(other, world64.reward, 1, 1, W, torch.zeros(W.shape[0]), null.embeds, null.pooled,
                            "prompt")
    with pytest.raises(ValueError, match="not built on this policy's transformer"):
        SharedHeadGuide(policy, critic, 4.5)
    assert isinstance(make_guide(policy, world64.tweedie, 4.5), TweedieGuide)
    assert isinstance(make_guide(policy, critic, 4.5, fused=False), CriticGuide)


def test_shared_head_refuses_enabled_lora_adapters():
    from policies.lora import LoraSpec, add_lora

    world = tiny_world()
    add_lora(world.policy.transformer, LoraSpec(r=2, alpha=2.0))
    with pytest.raises(ValueError, match="peft adapters are enabled"):
        SharedHeadGuide(world.policy, world.stitchvm, 4.5)


def test_prompt_head_guide_refuses_other_prompt_embeddings(world64, prompt_critic):
    """The conditional half is shared only if it is the head's own conditioning: other embeddings are an error."""
    policy = world64.policy
    z, sigma, _ = inputs(policy)
    other = policy.encode_prompts(list(reversed(PROMPTS)))
    with pytest.raises(ValueError, match="not the critic head's encoding"):
        SharedHeadGuide(policy, prompt_critic, 4.5)(z, sigma, other, PROMPTS)
