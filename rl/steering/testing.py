"""A tiny, randomly initialised steering world (policy + CLIP reward + StitchVM + Tweedie critic) for tests, the
CLI's ``--world tiny`` smoke run and the GPU benchmark's ``--tiny`` CPU check. No downloads, milliseconds per step.

Sizes: the tiny policy of ``policies.testing`` (16x16 images, (4, 8, 8) latents, a 2-block MMDiT of width 16,
4x4 DiT tokens), an open_clip CLIP on 16x16 images with 4x4 patches (so the stitch needs no resampling) and the
Shapes word tokenizer; the StitchVM is (i, j) = (1, 1) with a random stitch (no interface fit: numbers, not quality).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from critics.baselines import TweedieCritic
from critics.rewards.clip_score import CLIPScore
from critics.stitchvm import StitchVM, build_stitchvm
from policies.flow import FlowPolicy
from policies.testing import tiny_policy

TINY_CONTEXT = 16


class TinyWorld(NamedTuple):
    policy: FlowPolicy
    reward: CLIPScore
    stitchvm: StitchVM
    tweedie: TweedieCritic


def tiny_clip_reward(seed: int = 0, image_size: int = 16, patch_size: int = 4) -> CLIPScore:
    """CLIPScore of a tiny random open_clip CLIP that reads Shapes captions (word-level tokenizer)."""
    import open_clip

    from shapes.models import WordTokenize, build_tokenizer

    tokenizer = build_tokenizer(TINY_CONTEXT)
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=image_size, layers=2, width=32,
                                                         patch_size=patch_size, head_width=16),
                           text_cfg=dict(context_length=TINY_CONTEXT, vocab_size=len(tokenizer), width=32, heads=2,
                                         layers=2)).eval()
    return CLIPScore(model, WordTokenize(tokenizer, TINY_CONTEXT))


def random_stitchvm(policy: FlowPolicy, reward: nn.Module, i: int, j: int = 1, seed: int = 0,
                    latent_size: int | None = None, zero_stitch: bool = False, probe_pixels=None,
                    head_conditioning: str = "null_text") -> StitchVM:
    """A StitchVM on ``policy.transformer`` with a random (or zero) stitch W of the right shape: for timing and for
    exactness tests, not for quality. ``probe_pixels`` are needed for j > 1 (the class token's initial value);
    ``head_conditioning`` "prompt" runs the head on the prompt through ``policy.encode_prompts``."""
    transformer = policy.transformer
    d_dit = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    d_tail = reward.vision.conv1.out_channels
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(d_tail, d_dit) if zero_stitch else torch.randn(d_tail, d_dit, generator=g) / d_dit**0.5
    b = torch.zeros(d_tail)
    null = policy.null_embeds()
    critic = build_stitchvm(transformer, reward, i, j, W, b, null.embeds, null.pooled, "prompt",
                            latent_size=latent_size, probe_pixels=probe_pixels,
                            encode_prompts=policy.encode_prompts if head_conditioning == "prompt" else None)
    device, dtype = policy.device, next(reward.parameters()).dtype
    critic.stitch.to(device=device, dtype=dtype)
    critic.tail.to(device=device, dtype=dtype)
    return critic.eval()


def tiny_world(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> TinyWorld:
    """The tiny policy, reward, StitchVM (i = 1) and Tweedie critic (guidance 1), in ``dtype`` on ``device``."""
    policy = tiny_policy(seed=seed).to(device=device, dtype=dtype)
    reward = tiny_clip_reward(seed).to(device=device, dtype=dtype)
    critic = random_stitchvm(policy, reward, i=1, seed=seed)
    # the random stitch starts with G = 0; move it so the whole s_psi is exercised
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in critic.stitch.G.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return TinyWorld(policy, reward, critic, TweedieCritic(policy, reward, guidance_scale=1.0))
