"""Tiny, randomly initialised SD3-family components built from configs (no downloads), for tests and examples.

The same classes as the real models (diffusers ``SD3Transformer2DModel`` / ``AutoencoderKL``, transformers
``CLIPTextModelWithProjection``) at a few thousand parameters, so every code path runs on a CPU in milliseconds.
"""

from __future__ import annotations

import torch

from policies.flow import FlowPolicy
from policies.text_encoders import CLIPTextEncoder, word_tokenizer

TINY_WORDS = ("a", "an", "red", "green", "blue", "circle", "square", "triangle", "two", "three", "left", "of",
              "right", "above", "below", "the", "and", "photo")


def tiny_clip_text_encoder(hidden: int = 32, proj: int = 32, max_length: int = 16, seed: int = 0) -> CLIPTextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = word_tokenizer(TINY_WORDS, max_length=max_length)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                         projection_dim=proj, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return CLIPTextEncoder(CLIPTextModelWithProjection(cfg).eval(), tokenizer, max_length)


def tiny_transformer(sample_size: int = 8, in_channels: int = 4, num_layers: int = 2, joint_dim: int = 32,
                     pooled_dim: int = 32, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=in_channels, num_layers=num_layers,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_dim,
                                 caption_projection_dim=16, pooled_projection_dim=pooled_dim,
                                 out_channels=in_channels, pos_embed_max_size=16).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                         scaling_factor=1.5305, shift_factor=0.0609).eval()


def tiny_policy(seed: int = 0, shift: float = 3.0) -> FlowPolicy:
    """16x16 images, 8x8x4 latents, a 2-block MMDiT, one CLIP text tower."""
    return FlowPolicy(tiny_transformer(seed=seed), tiny_vae(seed=seed), tiny_clip_text_encoder(seed=seed),
                      shift=shift)
