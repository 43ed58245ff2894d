"""FlowPolicy against diffusers' StableDiffusion3Pipeline, and its input checks."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from policies import samplers
from policies.testing import tiny_policy


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def _pipeline(policy):
    return StableDiffusion3Pipeline(transformer=policy.transformer, vae=policy.vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=policy.shift),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_full_sample_equals_sd3_pipeline(policy, guidance):
    prompts = ["a red circle", "two green triangles above a blue square"]
    cond, null = policy.encode_prompts(prompts), policy.null_embeds().expand(2)
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = policy.decode(samplers.sample(policy.velocity_fn(cond, guidance), z_T, policy.sigmas(8)).z_tau)
        ref = _pipeline(policy)(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
                                negative_prompt_embeds=null.embeds, negative_pooled_prompt_embeds=null.pooled,
                                latents=z_T, num_inference_steps=8, guidance_scale=guidance,
                                height=policy.image_size, width=policy.image_size, output_type="pt").images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_encode_decode_conventions(policy):
    """decode undoes the SD3 normalisation; encode is its inverse on the latent side."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = policy.decode(z)
        raw = policy.vae.decode(z / 1.5305 + 0.0609).sample
        assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
        torch.testing.assert_close(img, (raw / 2 + 0.5).clamp(0, 1))
        z0 = policy.encode(img)
        mode = policy.vae.encode(img * 2 - 1).latent_dist.mode()
        torch.testing.assert_close(z0, (mode - 0.0609) * 1.5305)
    assert len(policy.to_pil(img)) == 2 and policy.to_pil(img)[0].size == (16, 16)


def test_cfg_combination(policy):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = policy.encode_prompts(["a red circle", "a blue square"])
    null = policy.null_embeds().expand(2)
    with torch.no_grad():
        v_c, v_u = policy.velocity(z, 0.5, cond), policy.velocity(z, 0.5, null)
        torch.testing.assert_close(policy.velocity(z, 0.5, cond, 4.0), v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, match", [((1, 3, 8, 8), "4, h, w"), ((1, 4, 7, 8), "multiples"),
                                          ((4, 8, 8), "4, h, w"), ((1, 4, 64, 64), "position-embedding")])
def test_bad_latent_shapes(policy, shape, match):
    cond = policy.encode_prompts(["a red circle"] * shape[0])
    with pytest.raises(ValueError, match=match):
        policy.velocity(torch.zeros(shape), 0.5, cond)


def test_prompt_batch_mismatch_and_bad_prompts(policy):
    with pytest.raises(ValueError, match="prompt embeddings for a batch of 2"):
        policy.velocity(torch.zeros(2, 4, 8, 8), 0.5, policy.encode_prompts(["a"]))
    with pytest.raises(TypeError, match="list of strings"):
        policy.encode_prompts("a red circle")
    with pytest.raises(ValueError, match="empty"):
        policy.encode_prompts([])


def test_bad_components():
    from policies.flow import FlowPolicy
    from policies.testing import tiny_clip_text_encoder, tiny_transformer, tiny_vae

    with pytest.raises(ValueError, match="latent_channels=8"):
        FlowPolicy(tiny_transformer(), tiny_vae(latent_channels=8), tiny_clip_text_encoder())
    with pytest.raises(FileNotFoundError, match="no SD3 checkpoint directory"):
        FlowPolicy.from_pretrained("/nonexistent/sd3")


def test_resolution_other_than_the_transformers_sample_size():
    # SD3.5-Medium's sample_size is 128 latents (1024^2); its 512^2 setups pass resolution=512. Tiny: VAE factor 2,
    # patch 2, sample_size 8 (16^2 images), position embedding for 16 patches a side (64^2 images at most).
    from policies.flow import FlowPolicy
    from policies.testing import tiny_clip_text_encoder, tiny_transformer, tiny_vae

    policy = FlowPolicy(tiny_transformer(), tiny_vae(), tiny_clip_text_encoder(), resolution=32)
    assert (policy.latent_size, policy.image_size) == (16, 32)
    z_T = policy.noise(2, torch.Generator().manual_seed(0))
    assert z_T.shape == (2, 4, 16, 16)
    with torch.no_grad():
        z0 = samplers.sample(policy.velocity_fn(policy.encode_prompts(["a", "b"])), z_T, policy.sigmas(2)).z_tau
        assert policy.decode(z0).shape == (2, 3, 32, 32)
    assert tiny_policy().latent_size == 8  # default: the transformer's sample_size
    for bad, match in ((30, "multiple of 4"), (0, "multiple of 4"), (68, "covers 16")):
        with pytest.raises(ValueError, match=match):
            FlowPolicy(tiny_transformer(), tiny_vae(), tiny_clip_text_encoder(), resolution=bad)
