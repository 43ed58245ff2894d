"""StitchVM model: tails cut/re-join exactly, head = the DiT's own blocks, stitch init, gradients, save/load."""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from critics.base import Critic
from critics.stitchvm import (DiTHead, ImageScore, PromptScore, Stitch, build_stitchvm, load_stitchvm, resample_grid,
                              save_stitchvm)
from critics.tails import ClipPreprocess, HFCLIPTail, OpenCLIPTail, make_tail

LATENT = 16  # tiny latents (4, 16, 16) → 8×8 DiT tokens; the tiny CLIP sees 32×32 images → 4×4 patches


# ---- tiny models shared by tests/critics/test_{stitchvm,interface,distill}.py ------------------------------------
def tiny_open_clip(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, layers=4, width=64, patch_size=8, head_width=16),
                          text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)).eval()


def tiny_hf_vision(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, projection_dim=32)
    return CLIPVisionModelWithProjection(cfg).eval()


def tiny_sd3(seed: int = 0, in_channels: int = 4, num_layers: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=in_channels, num_layers=num_layers,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=32, out_channels=in_channels).eval()


def null_cond(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)


class TinyReward(nn.Module):
    """Implements the Reward contract used by StitchVM on a tiny open_clip CLIP (or an HF vision tower)."""

    def __init__(self, seed: int = 0, hf: bool = False):
        super().__init__()
        self.clip = tiny_open_clip(seed)
        self.vision = tiny_hf_vision(seed) if hf else self.clip.visual
        self.preprocess = ClipPreprocess((32, 32))
        self.aesthetic = nn.Linear(32, 1)
        self.text_calls = 0

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), 16, dtype=torch.long)
        for r, p in enumerate(prompts):
            words = [1 + sum(map(ord, w)) % 97 for w in p.split()][:14]
            ids[r, :len(words)] = torch.tensor(words, dtype=torch.long)
            ids[r, len(words)] = 99  # end-of-text = the largest id (open_clip pools at argmax)
        return ids

    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images)
        if isinstance(self.vision, CLIPVisionModelWithProjection):
            return self.vision(pixel_values=pixels).image_embeds
        return self.vision(pixels)

    def text_embed(self, prompts: list[str]) -> torch.Tensor:
        self.text_calls += 1
        return self.clip.encode_text(self.tokenize(prompts))

    def score_from_embeds(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)

    def score_from_image_embed(self, img: torch.Tensor) -> torch.Tensor:
        return self.aesthetic(F.normalize(img, dim=-1)).squeeze(-1)


def random_fit(head: DiTHead, width: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(width, head.width, generator=g, dtype=torch.float64), torch.randn(width, generator=g)


def tiny_stitchvm(j: int = 1, score_kind: str = "prompt", seed: int = 0, hf: bool = False, stitch_blocks: int = 0):
    """(model, transformer, reward, null_embeds, null_pooled) with a random (not fitted) W, b."""
    transformer, reward = tiny_sd3(seed), TinyReward(seed, hf=hf)
    embeds, pooled = null_cond()
    head = DiTHead(transformer, 2, embeds, pooled, LATENT)
    W, b = random_fit(head, 64)
    probe = reward.preprocess(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    model = build_stitchvm(transformer, reward, 2, j, W, b, embeds, pooled, score_kind, latent_size=LATENT,
                           probe_pixels=probe, stitch_blocks=stitch_blocks,
                           meta={"backbone": "tiny-sd3", "reward": "tiny-clip"})
    return model, transformer, reward, embeds, pooled


def perturb_(module: nn.Module, seed: int = 5, scale: float = 0.05) -> None:
    """Move every parameter (e.g. to leave the G ≡ 0 initialisation), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---- tails --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_tail_rejoined_equals_library_embedding(kind):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    if kind == "open_clip":
        clip = tiny_open_clip()
        tail, ref = OpenCLIPTail(clip.visual), clip.encode_image(pixels)
    else:
        vision = tiny_hf_vision()
        tail, ref = HFCLIPTail(vision), vision(pixel_values=pixels).image_embeds
    with torch.no_grad():
        out = tail.forward_from(tail.prefix(pixels, 1), 1)  # the tail's own stem as the "head"
        torch.testing.assert_close(out.embed, ref, rtol=1e-6, atol=1e-6)
        assert out.tokens.shape == (3, 17, 64)
        prefixes = tail.prefixes(pixels, [1, 2, 3, 4])
        for j in (2, 3, 4):  # with the class token entering block j taken from the same image
            pre = prefixes[j]
            torch.testing.assert_close(tail.forward_from(pre.tokens, j, pre.class_token).embed, ref,
                                       rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(pre.tokens, tail.prefix(pixels, j))


def test_tail_stem_is_patch_embedding_before_class_token():
    clip = tiny_open_clip()
    tail = OpenCLIPTail(clip.visual)
    pixels = torch.randn(2, 3, 32, 32)
    conv = clip.visual.conv1(pixels)  # (2, 64, 4, 4)
    torch.testing.assert_close(tail.stem(pixels), conv.flatten(2).transpose(1, 2))
    assert tail.grid == (4, 4) and tail.width == 64 and tail.num_blocks == 4 and tail.embed_dim == 32


def test_tail_suffix_parameters_and_errors():
    tail = OpenCLIPTail(tiny_open_clip().visual)
    names1 = {n for n, _ in tail.suffix_named_parameters(1)}
    names3 = {n for n, _ in tail.suffix_named_parameters(3)}
    assert "conv1.weight" not in names1 and "class_embedding" in names1 and "ln_pre.weight" in names1
    assert not any(n.startswith(("transformer.resblocks.0.", "transformer.resblocks.1.")) for n in names3)
    assert "transformer.resblocks.2.attn.in_proj_weight" in names3 and "class_embedding" not in names3
    assert "proj" in names3 and "ln_post.weight" in names3
    tokens = torch.randn(1, 16, 64)
    with pytest.raises(ValueError, match="must be None for j = 1"):
        tail.forward_from(tokens, 1, torch.zeros(64))
    with pytest.raises(ValueError, match="needs the class token"):
        tail.forward_from(tokens, 2)
    with pytest.raises(ValueError, match=r"j must be in \[1, 4\]"):
        tail.forward_from(tokens, 5, torch.zeros(64))
    with pytest.raises(ValueError, match="patch_tokens must be"):
        tail.forward_from(torch.randn(1, 9, 64), 1)


# ---- head ---------------------------------------------------------------------------------------------------------
def test_head_equals_transformer_block_outputs():
    transformer = tiny_sd3()
    embeds, pooled = null_cond()
    head = DiTHead(transformer, 3, embeds, pooled, LATENT)  # i = num_layers: last block is context_pre_only
    z = torch.randn(2, 4, LATENT, LATENT)
    sigma = torch.tensor([0.3, 0.7])
    captured = {}
    hooks = [blk.register_forward_hook(lambda m, args, out, k=k: captured.__setitem__(k + 1, out[1]))
             for k, blk in enumerate(transformer.transformer_blocks)]
    with torch.no_grad():
        transformer(hidden_states=z, encoder_hidden_states=embeds.expand(2, -1, -1),
                    pooled_projections=pooled.expand(2, -1), timestep=sigma * 1000)
        taps = head.forward_taps(z, sigma, [1, 2, 3])
    for h in hooks:
        h.remove()
    for i in (1, 2, 3):
        torch.testing.assert_close(taps[i], head.features_from_block_outputs(captured[i], LATENT, LATENT))
    assert taps[3].shape == (2, 16, 8, 8)
    with torch.no_grad():  # a head of depth 2 equals the depth-3 head tapped after block 2; scalar sigma broadcasts
        torch.testing.assert_close(DiTHead(transformer, 2, embeds, pooled, LATENT)(z, 0.5),
                                   head.forward_taps(z, torch.tensor([0.5, 0.5]), [2])[2])


@pytest.mark.parametrize("i", [0, 4])
def test_head_rejects_bad_depth(i):
    embeds, pooled = null_cond()
    with pytest.raises(ValueError, match=r"i must be in \[1, 3\]"):
        DiTHead(tiny_sd3(), i, embeds, pooled)


def test_head_ignores_lora_adapters_and_keeps_fingerprint():
    from peft import LoraConfig

    transformer = tiny_sd3()
    embeds, pooled = null_cond()
    head = DiTHead(transformer, 2, embeds, pooled, LATENT)
    z = torch.randn(2, 4, LATENT, LATENT)
    with torch.no_grad():
        before = head(z, 0.4)
    fingerprint = head.fingerprint()
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    head = DiTHead(transformer, 2, embeds, pooled, LATENT)
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    with torch.no_grad():
        torch.testing.assert_close(head(z, 0.4), before)
        assert not torch.allclose(transformer.transformer_blocks[0].attn.to_q(torch.ones(1, 16)),
                                  transformer.transformer_blocks[0].attn.to_q.base_layer(torch.ones(1, 16)))
    assert all(p.requires_grad for p in lora)  # the adapters' trainability is restored after the head ran
    assert head.fingerprint() == fingerprint


# ---- stitch -------------------------------------------------------------------------------------------------------
def test_stitch_at_init_is_the_linear_fit():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(64, 16, generator=g, dtype=torch.float64), torch.randn(64, generator=g)
    h = torch.randn(2, 16, 4, 4, generator=g)
    same = Stitch(16, 64, (4, 4), (4, 4), W, b)
    expected = torch.einsum("od,bdn->bno", W.float(), h.flatten(2)) + b  # (B, N, D): W h + b per token
    torch.testing.assert_close(same(h), expected, rtol=1e-6, atol=1e-6)

    shrink = Stitch(16, 64, (8, 8), (4, 4), W, b)
    h8 = torch.randn(2, 16, 8, 8, generator=g)
    Wh = torch.einsum("od,bdxy->boxy", W.float(), h8) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(shrink(h8), resample_grid(Wh, (4, 4)).flatten(2).transpose(1, 2))
    # Up is linear with unit row sums, so Up(W h + b) = W Up(h) + b (what stage 1 relies on)
    Wuh = torch.einsum("od,bdxy->boxy", W.float(), resample_grid(h8, (4, 4))) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(resample_grid(Wh, (4, 4)), Wuh, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(shrink.G[-1].weight) == 0 and torch.count_nonzero(shrink.G[-1].bias) == 0
    assert shrink.G[1].out_channels == 64 // 8
    with pytest.raises(ValueError, match="stitch built for"):
        shrink(torch.randn(1, 16, 4, 4))


def test_stitch_blocks_start_as_the_identity_and_train():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(64, 16, generator=g, dtype=torch.float64), torch.randn(64, generator=g)
    h = torch.randn(2, 16, 8, 8, generator=g)
    plain, deep = Stitch(16, 64, (8, 8), (4, 4), W, b), Stitch(16, 64, (8, 8), (4, 4), W, b, blocks=2)
    torch.testing.assert_close(deep(h), plain(h), rtol=0, atol=0)  # s_psi = Up(F(h)) at initialisation
    assert len(deep.blocks) == 2 and deep.blocks[0].self_attn.num_heads == 1  # 64 wide: one 64-wide head
    assert deep.config() == {"bottleneck_ratio": 8, "stitch_blocks": 2}
    deep(h).square().sum().backward()
    out_proj = deep.blocks[0].linear2.weight.grad
    assert out_proj is not None and out_proj.abs().sum() > 0  # zero-initialised, not frozen
    # after a step the blocks mix tokens: one token's input moves other tokens' outputs (G_psi is per token)
    with torch.no_grad():
        for p in deep.blocks.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    h2 = h.clone()
    h2[:, :, 0, 0] += 1.0
    moved = (deep(h2) - deep(h)).abs().sum(-1)[0]  # (N,)
    assert (moved[1:] > 1e-6).all()
    assert (plain(h2) - plain(h)).abs().sum(-1)[0][-1] == 0  # the paper's stitch: the far corner is untouched
    with pytest.raises(ValueError, match="blocks must be >= 0"):
        Stitch(16, 64, (8, 8), (4, 4), W, b, blocks=-1)


# ---- StitchVM -----------------------------------------------------------------------------------------------------
def test_value_prompt_dependent_uses_cached_text_embeddings():
    model, _, reward, _, _ = tiny_stitchvm(j=1, score_kind="prompt")
    z = torch.randn(3, 4, LATENT, LATENT)
    prompts = ["a red circle", "two blue squares", "a red circle"]
    with torch.no_grad():
        v = model.value(z, 0.5, prompts)
        emb = model.features(z, 0.5).embed
        expected = reward.score_from_embeds(emb, reward.text_embed(prompts))
    torch.testing.assert_close(v, expected)
    calls = reward.text_calls
    with torch.no_grad():
        model.value(z, 0.5, prompts)
    assert reward.text_calls == calls  # served from the cache
    assert v.shape == (3,) and v.dtype == torch.float32
    assert (model.i, model.j, model.latent_channels, model.latent_size) == (2, 1, 4, LATENT)
    assert isinstance(model, Critic) and model.dense
    with pytest.raises(ValueError, match="one prompt per sample"):
        model.value(z, 0.5, prompts[:2])


def test_value_gradient_matches_finite_differences():
    model, _, _, _, _ = tiny_stitchvm(j=2, score_kind="image")
    perturb_(model.stitch)  # G ≠ 0 so the gradient also goes through G
    model = model.double()
    model.score.reward.double()  # the reward is not a submodule of StitchVM
    z = torch.randn(2, 4, LATENT, LATENT, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.3, 0.6], dtype=torch.float64)
    value = model.score(model.features(z, sigma).embed, None)  # float64 (value() casts to float32)
    (grad,) = torch.autograd.grad(value.sum(), z)
    eps = 1e-6
    for idx in [(0, 0, 0, 0), (0, 1, 5, 7), (1, 3, 15, 2), (1, 2, 8, 8)]:
        zp, zm = z.detach().clone(), z.detach().clone()
        zp[idx] += eps
        zm[idx] -= eps
        with torch.no_grad():
            fd = (model.score(model.features(zp, sigma).embed, None).sum()
                  - model.score(model.features(zm, sigma).embed, None).sum()) / (2 * eps)
        torch.testing.assert_close(grad[idx], fd, rtol=1e-6, atol=1e-9)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("j,hf,blocks", [(1, False, 0), (2, False, 0), (1, True, 0), (1, False, 2)])
def test_save_load_round_trip(tmp_path, j, hf, blocks):
    model, transformer, reward, embeds, pooled = tiny_stitchvm(j=j, hf=hf, stitch_blocks=blocks)
    perturb_(model.stitch, seed=6)
    perturb_(nn.ParameterList([p for _, p in model.tail_named_parameters()]), seed=7)
    z = torch.randn(2, 4, LATENT, LATENT)
    prompts = ["a red circle", "a blue square"]
    path = tmp_path / "critic"
    save_stitchvm(path, model, {"image_size": 32})
    save_stitchvm(path, model, {"image_size": 32})  # overwriting an existing checkpoint is atomic too
    assert sorted(os.listdir(path)) == ["manifest.json", "stitch.safetensors", "stitchvm.json", "tail.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p != "critic"] == []  # no temp dirs left behind
    loaded = load_stitchvm(path, transformer, reward, embeds, pooled)
    with torch.no_grad():
        assert torch.equal(loaded.value(z, 0.4, prompts), model.value(z, 0.4, prompts))
    assert loaded.head.transformer_blocks[0] is transformer.transformer_blocks[0]  # head shared, not duplicated
    assert (loaded.i, loaded.j, len(loaded.stitch.blocks)) == (2, j, blocks)


def test_load_rejects_wrong_pairing(tmp_path):
    model, transformer, reward, embeds, pooled = tiny_stitchvm()
    path = tmp_path / "critic"
    save_stitchvm(path, model, {"image_size": 32})
    with pytest.raises(ValueError, match="built for backbone tiny-sd3"):
        load_stitchvm(path, tiny_sd3(seed=9), reward, embeds, pooled)  # other weights
    with pytest.raises(ValueError, match="another latent space: 4 latent channels"):
        load_stitchvm(path, tiny_sd3(in_channels=8), reward, embeds, pooled)
    with pytest.raises(ValueError, match="another backbone"):
        load_stitchvm(path, tiny_sd3(num_layers=4), reward, embeds, pooled)
    with pytest.raises(ValueError, match="null-text conditioning"):
        load_stitchvm(path, transformer, reward, 2 * embeds, pooled)
    with pytest.raises(ValueError, match="distilled from another reward"):
        load_stitchvm(path, transformer, TinyReward(seed=9), embeds, pooled)
    with pytest.raises(ValueError, match="built for reward tiny-clip"):
        load_stitchvm(path, transformer, TinyReward(hf=True), embeds, pooled)
    os.remove(path / "tail.safetensors")
    with pytest.raises(FileNotFoundError, match="tail.safetensors"):
        load_stitchvm(path, transformer, reward, embeds, pooled)


def test_stitchvm_trains_only_stitch_and_tail_parameters():
    model, transformer, reward, _, _ = tiny_stitchvm(j=2)
    head_ids = {id(p) for p in model.head.parameters()}
    trained = model.stitch_parameters() + [p for _, p in model.tail_named_parameters()]
    assert not head_ids & {id(p) for p in trained}
    assert not {id(p) for p in reward.parameters()} & {id(p) for p in trained}  # tail is a copy of reward.vision
    assert all(not p.requires_grad for p in model.head.parameters())
    assert model.class_token is not None and model.class_token.shape == (64,)
    model.train()
    assert not model.head.training and not transformer.transformer_blocks[0].training
    assert isinstance(make_tail(reward.vision), OpenCLIPTail)
    assert isinstance(model.score, PromptScore) and isinstance(tiny_stitchvm(score_kind="image")[0].score, ImageScore)
    with pytest.raises(ValueError, match="score kind"):
        build_stitchvm(transformer, reward, 2, 1, *random_fit(model.head, 64), *null_cond(), "both")
    with pytest.raises(ValueError, match="probe_pixels"):
        build_stitchvm(transformer, reward, 2, 2, *random_fit(model.head, 64), *null_cond(), "image")
