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


# ---------------------------------------------------------------------------------------------------------------
# Real-size architectures with random weights (GPU benchmarks): the shapes of SD3.5-Medium and SD3's VAE.
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)


class RandomTextEncoder(torch.nn.Module):
    """Stands in for CLIP-L + CLIP-G + T5 in throughput benchmarks: fixed random embeddings of SD3's shapes
    (L = 77 + 256 tokens of width 4096, pooled 2048). The cost of real text encoding is paid once per prompt
    and is the same for every method compared, so it is left out."""

    def __init__(self, seq_len: int = 333, joint_dim: int = 4096, pooled_dim: int = 2048, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("embeds", torch.randn(1, seq_len, joint_dim, generator=g) * 0.1)
        self.register_buffer("pooled", torch.randn(1, pooled_dim, generator=g) * 0.1)

    def encode(self, prompts: list[str]):
        n = len(prompts)
        return self.embeds.expand(n, -1, -1).clone(), self.pooled.expand(n, -1).clone()


def sd35_medium_policy(resolution: int = 1024, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                       seed: int = 0) -> FlowPolicy:
    """SD3.5-Medium-shaped transformer + SD3 VAE, random weights, for timing and memory benchmarks."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**SD35_MEDIUM, "sample_size": resolution // 8})
    vae = AutoencoderKL(**SD3_VAE)
    policy = FlowPolicy(transformer.eval(), vae.eval(), RandomTextEncoder(seed=seed), shift=3.0)
    return policy.to(device=device, dtype=dtype)
