"""A prompt-conditioned StitchVM head (head_conditioning "prompt"): the head is the policy's own conditional forward
up to block i, the value follows the prompt, save/load keeps it, stage 2 feeds it the captions (with dropout),
stage 3 and the build wire it, and steering does not share CFG's null branch with it."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from critics.build import MixedStream, build, load_config
from critics.distill import DistillConfig, distill
from critics.stitchvm import DiTHead, HeadText, build_stitchvm, load_stitchvm, save_stitchvm
from policies.flow import PromptEmbeds
from tests.critics.test_stitchvm import LATENT, TinyReward, null_cond, perturb_, random_fit, tiny_sd3
from tests.critics.tiny_world import BUILD_YAML, tiny_overrides

PROMPTS = ["a red circle", "two blue squares", "a red circle"]


class WordEncoder:
    """A deterministic stand-in for the policy's text encoder: (5, 32) token rows and a (32,) pooled row per prompt,
    from the words; "" gives null_cond() exactly (the head's null buffers). Counts the prompts it encodes."""

    def __init__(self):
        self.encoded: list[str] = []

    def __call__(self, prompts: list[str]) -> PromptEmbeds:
        self.encoded.extend(prompts)
        embeds, pooled = [], []
        for p in prompts:
            if p == "":
                e, q = null_cond()
                e, q = e[0], q[0]
            else:
                g = torch.Generator().manual_seed(sum(map(ord, p)))
                e, q = torch.randn(5, 32, generator=g), torch.randn(32, generator=g)
            embeds.append(e)
            pooled.append(q)
        return PromptEmbeds(torch.stack(embeds), torch.stack(pooled))


def prompt_stitchvm(seed: int = 0):
    transformer, reward = tiny_sd3(seed), TinyReward(seed)
    embeds, pooled = null_cond()
    head = DiTHead(transformer, 2, embeds, pooled, LATENT)
    W, b = random_fit(head, 64)
    encoder = WordEncoder()
    model = build_stitchvm(transformer, reward, 2, 1, W, b, embeds, pooled, "prompt", latent_size=LATENT,
                           meta={"backbone": "tiny-sd3", "reward": "tiny-clip"}, encode_prompts=encoder)
    perturb_(model.stitch, seed=6)  # leave G ≡ 0
    return model, transformer, reward, encoder


def test_prompt_head_is_the_conditional_forward_up_to_block_i():
    transformer = tiny_sd3()
    embeds, pooled = null_cond()
    head = DiTHead(transformer, 2, embeds, pooled, LATENT)
    z, sigma = torch.randn(3, 4, LATENT, LATENT), torch.tensor([0.2, 0.5, 0.9])
    cond = WordEncoder()(PROMPTS)
    captured = {}
    hook = transformer.transformer_blocks[1].register_forward_hook(lambda m, a, out: captured.update(h=out[1]))
    with torch.no_grad():
        transformer(hidden_states=z, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                    pooled_projections=cond.pooled)
        hook.remove()  # the head runs the same block objects
        got = head(z, sigma, (cond.embeds, cond.pooled))
        null_rows = head(z, sigma, (embeds.expand(3, -1, -1), pooled.expand(3, -1)))
        null = head(z, sigma)
    torch.testing.assert_close(got, head.features_from_block_outputs(captured["h"], LATENT, LATENT))
    torch.testing.assert_close(null_rows, null)  # cond=None is the null prompt on every row
    assert not torch.allclose(got, null, atol=1e-4)
    with pytest.raises(ValueError, match="cond must be"):
        head(z, sigma, (cond.embeds[:2], cond.pooled[:2]))


def test_prompt_conditioned_value_follows_the_prompt_row_by_row():
    model, _, _, encoder = prompt_stitchvm()
    assert model.head_conditioning == "prompt"
    z = torch.randn(3, 4, LATENT, LATENT, requires_grad=True)
    v = model.value(z, 0.4, PROMPTS)
    with torch.no_grad():
        one_by_one = torch.cat([model.value(z[k:k + 1], 0.4, [p]) for k, p in enumerate(PROMPTS)])
        swapped = model.value(z, 0.4, ["two blue squares"] * 3)
        null = model.features(z, 0.4).embed
        null_ref = model.features_from_head(model.head(z, 0.4)).embed
    torch.testing.assert_close(v.detach(), one_by_one, rtol=1e-5, atol=1e-6)
    assert (v.detach() - swapped).abs()[[0, 2]].min() > 1e-4 and (v.detach() - swapped)[1].abs() < 1e-6
    torch.testing.assert_close(null, null_ref)  # prompts=None: the head on "" (the retrieval embedding)
    with torch.no_grad():  # the embedding itself follows the prompt (the score alone would, even on null text)
        red = model.features(z, 0.4, ["a red circle"] * 3).embed
        blue = model.features(z, 0.4, ["two blue squares"] * 3).embed
    assert (red - blue).abs().amax(-1).min() > 1e-4 and (red - null).abs().amax(-1).min() > 1e-4
    cached = model.head_text._cache["a red circle"]
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in cached)  # own rows, not views
    (grad,) = torch.autograd.grad(v.sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert encoder.encoded.count("a red circle") == 1  # cached per prompt string
    with pytest.raises(ValueError, match="prompt-conditioned"):
        model.value(z, 0.4)
    with pytest.raises(ValueError, match="one prompt per latent"):
        model.features(z, 0.4, PROMPTS[:2])
    assert copy.deepcopy(model).head_text is model.head_text  # a copy shares the policy's encoder


def test_prompt_head_save_load_round_trip(tmp_path):
    model, transformer, reward, encoder = prompt_stitchvm()
    embeds, pooled = null_cond()
    save_stitchvm(tmp_path / "c", model)
    meta = json.loads((tmp_path / "c" / "stitchvm.json").read_text())
    assert (meta["head_conditioning"], meta["format_version"]) == ("prompt", 2)  # version 1 readers refuse it
    loaded = load_stitchvm(tmp_path / "c", transformer, reward, embeds, pooled, encode_prompts=encoder)
    z = torch.randn(3, 4, LATENT, LATENT)
    with torch.no_grad():
        assert torch.equal(loaded.value(z, 0.3, PROMPTS), model.value(z, 0.3, PROMPTS))
    shared = HeadText(encoder)
    assert load_stitchvm(tmp_path / "c", transformer, reward, embeds, pooled, encode_prompts=shared).head_text is shared
    with pytest.raises(ValueError, match="pass encode_prompts"):
        load_stitchvm(tmp_path / "c", transformer, reward, embeds, pooled)
    from rl.checkpoint import write_manifest

    meta["format_version"] = 1  # a prompt head written as version 1: refused, never run on null text
    (tmp_path / "c" / "stitchvm.json").write_text(json.dumps(meta))
    write_manifest(tmp_path / "c")
    with pytest.raises(ValueError, match="inconsistent"):
        load_stitchvm(tmp_path / "c", transformer, reward, embeds, pooled, encode_prompts=encoder)


def test_stage2_feeds_the_captions_with_dropout():
    model, _, reward, _ = prompt_stitchvm()
    seen: list[str] = []
    real = model.head_cond

    def recording(prompts, batch):
        seen.extend(prompts)
        return real(prompts, batch)

    model.head_cond = recording
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = [f"a red circle number {k % 7}" for k in range(64)]

    def encode(x):  # a fixed "VAE": average-pool to the latent grid, 4 channels
        return torch.nn.functional.adaptive_avg_pool2d(x, LATENT).repeat(1, 2, 1, 1)[:, :4]

    cfg = DistillConfig(batch_size=32, epochs=3, warmup_steps=0, caption_dropout=0.25, progress=False, log_every=100)
    distill(model, reward, encode, [(images, captions)], cfg)
    assert len(seen) == 3 * 64
    dropped = seen.count("") / len(seen)
    assert abs(dropped - 0.25) < 4 * (0.25 * 0.75 / len(seen)) ** 0.5
    assert set(seen) - {""} <= set(captions)
    with pytest.raises(ValueError, match="needs each training image's caption"):
        distill(model, reward, encode, [images], cfg)
    # the own-caption score term scores against the real captions, the ones the head's dropout blanked included
    scored: list[str] = []

    def text_embed(prompts):
        scored.extend(prompts)
        return reward.text_embed(prompts)

    distill(model, reward, encode, [(images, captions)], replace(cfg, epochs=1, lambda_own_score=1.0),
            text_embed_fn=text_embed)
    assert scored == captions


def test_mixed_stream_gives_policy_samples_their_prompts():
    data = [(torch.zeros(6, 3, 4, 4), ["data"] * 6) for _ in range(2)]
    bank = torch.arange(1, 6, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 4, 4).contiguous()
    for images, texts in MixedStream(data, bank, 0.5, seed=1, bank_prompts=[f"p{k}" for k in range(1, 6)]):
        assert len(texts) == images.shape[0] == 12
        for image, text in zip(images, texts):
            value = round(float(image[0, 0, 0]) * 255)
            assert text == ("data" if value == 0 else f"p{value}")
    with pytest.raises(ValueError, match="pass bank_prompts"):
        list(MixedStream(data, bank, 0.5, seed=1))
    with pytest.raises(ValueError, match="prompts for 5 policy samples"):
        MixedStream(data, bank, 0.5, seed=1, bank_prompts=["p"])


def test_build_and_load_a_prompt_conditioned_critic(world, tmp_path):
    from critics import load
    from rl.steering.guides import CriticGuide, SharedHeadGuide, make_guide
    from shapes.models import load_shapes_policy, load_shapes_reward

    out = tmp_path / "c"
    result = build(load_config(BUILD_YAML, tiny_overrides(
        world, out, "head_conditioning=prompt", "policy_samples.n=4", "policy_samples.batch_size=4",
        "policy_samples.num_steps=2", "policy_samples.prompts={_component_: shapes.data.prompts, split: train, n: 4, "
        "seed: 5}", "distill.max_steps=2")))
    assert result.model.head_conditioning == "prompt"
    policy, reward = load_shapes_policy(weights_dir=world), load_shapes_reward(weights_dir=world)
    critic = load.stitchvm(policy, reward, out)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(critic.value(z, 0.5, ["a red circle"] * 2),
                                   result.model.value(z, 0.5, ["a red circle"] * 2), rtol=1e-5, atol=1e-6)
        red, green = (critic.features(z, 0.5, [p] * 2).embed for p in ("a red circle", "three green stars"))
        assert (red - green).abs().amax(-1).min() > 1e-5  # the loaded head runs on the prompt
    guide = make_guide(policy, critic, 4.5)  # the head is CFG's conditional half (tests/rl/steering/test_guides.py)
    assert isinstance(guide, SharedHeadGuide) and guide.branch == "cond"
    assert isinstance(make_guide(policy, critic, 4.5, fused=False), CriticGuide)
    with pytest.raises(ValueError, match="replays the null-text head"):
        SharedHeadGuide(policy, critic, 4.5, cuda_graph="tail")
    with pytest.raises(ValueError, match="prompt-conditioned head with fused=True"):
        make_guide(policy, critic, 4.5, cuda_graph="tail")


@pytest.mark.parametrize("extra,message", [
    (["kind=vae_stitch", "head_conditioning=prompt"], "kind=vae_stitch has no DiT head to condition"),
    (["head_conditioning=text"], "head_conditioning"),
])
def test_build_rejects_bad_head_conditioning(world, tmp_path, extra, message):
    from rl.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(BUILD_YAML, tiny_overrides(world, tmp_path / "c", *extra))


def test_stage1_fits_the_conditioned_features():
    from critics.interface import collect_features
    from critics.tails import make_tail

    transformer, reward = tiny_sd3(), TinyReward()
    embeds, pooled = null_cond()
    head = DiTHead(transformer, 2, embeds, pooled, LATENT)
    tail = make_tail(reward.vision, reward.preprocess)
    g = torch.Generator().manual_seed(0)
    images, latents = torch.rand(4, 3, 32, 32, generator=g), torch.randn(4, 4, LATENT, LATENT, generator=g)
    cond = WordEncoder()(PROMPTS + ["three green stars"])
    feats = [collect_features(head, tail, images, latents, [2], [1], torch.full((4,), 0.5),
                              torch.Generator().manual_seed(1), 2, cond=c) for c in ((cond.embeds, cond.pooled), None)]
    assert not torch.allclose(feats[0].dit[2], feats[1].dit[2], atol=1e-4)  # the probes' captions reach the head
    torch.testing.assert_close(feats[0].tail[1], feats[1].tail[1])  # the reward's targets do not depend on them
    # and each probe reaches the head with its own caption: the head on the same z_t (eps drawn per batch of 2)
    g = torch.Generator().manual_seed(1)
    eps = torch.cat([torch.randn(2, *latents.shape[1:], generator=g) for _ in range(2)])
    from critics.stitchvm import grid_to_tokens, resample_grid

    with torch.no_grad():
        h = head(0.5 * latents + 0.5 * eps, torch.full((4,), 0.5), (cond.embeds, cond.pooled))
    torch.testing.assert_close(feats[0].dit[2], grid_to_tokens(resample_grid(h, tail.grid)).reshape(-1, head.width))
