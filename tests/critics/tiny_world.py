"""A tiny random Shapes world on disk: the shipped file layout and loaders (shapes/models.py) at toy sizes.

Images 32×32, VAE latents (4, 8, 8), a 3-block MMDiT of width 32 (4×4 tokens), an open_clip CLIP with a 4-block
vision tower of width 64 on a 4×4 patch grid, the real Shapes word tokenizer. Everything loads through
`shapes.models.load_shapes_policy(weights_dir=...)` / `load_shapes_reward(weights_dir=...)`, so configs that
name those loaders run unchanged with `policy.weights_dir=<dir>`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shapes import models

IMAGE_SIZE = 32
BUILD_YAML = str(Path(__file__).resolve().parents[2] / "configs" / "critic" / "build_shapes.yaml")
POLICY_CFG = {"shift": 3.0, "guidance_scale": 1.0, "num_steps": 6, "context_length": models.CONTEXT_LENGTH,
              "train_step": 0}


def write_tiny_shapes_weights(weights_dir: str | Path, seed: int = 0, dit_seed: int | None = None) -> Path:
    """Write random tiny Shapes weights; `dit_seed` changes only the transformer (another backbone, same VAE)."""
    weights_dir = Path(weights_dir)
    torch.manual_seed(seed)
    vae = models.build_vae({**models.vae_config(block_out_channels=(8, 16, 16), norm_num_groups=4,
                                                image_size=IMAGE_SIZE), "scaling_factor": 1.5, "shift_factor": 0.1})
    tokenizer = models.build_tokenizer()
    text = models.build_text_encoder(models.text_encoder_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                                                projection_dim=32))
    torch.manual_seed(seed if dit_seed is None else dit_seed)
    transformer = models.build_transformer(models.transformer_config(32, 32, num_layers=3, num_heads=2, head_dim=16,
                                                                     latent_size=IMAGE_SIZE // 4))
    torch.manual_seed(seed + 1)
    clip_cfg = models.clip_config(len(tokenizer), embed_dim=32, image_size=IMAGE_SIZE, patch_size=8, vision_width=64,
                                  vision_layers=4, head_width=16, text_width=32, text_heads=2, text_layers=1)
    clip = models.build_clip(clip_cfg)
    models.save_vae(vae, weights_dir)
    models.save_policy(transformer, text, tokenizer, weights_dir, POLICY_CFG)
    models.save_clip(clip, clip_cfg, tokenizer, weights_dir)
    return weights_dir


def tiny_overrides(world: Path, out: Path, *extra: str) -> list[str]:
    """build_shapes.yaml shrunk to seconds: tiny weights, 32² renders, 24 probes, 4 distillation steps; float32
    storage and the heatmap next to the weights (the shipped build sends it to docs/img/)."""
    return [f"+policy.weights_dir={world}", f"+reward.weights_dir={world}", f"+data.size={IMAGE_SIZE}",
            "data.num_samples=256", f"output_dir={out}", "probe.n=24", "probe.batch_size=12",
            "distill.batch_size=8", "distill.max_steps=4", "distill.warmup_steps=2", "distill.log_every=2",
            "distill.ckpt_every=2", "distill.progress=false", "loader_batch_size=8", f"meta.image_size={IMAGE_SIZE}",
            "store_dtype=float32", "heatmap=null", "onpolicy.enabled=false", "onpolicy.steps=2",
            "onpolicy.trajectories=4", "onpolicy.latents_per_trajectory=2", "onpolicy.num_steps=[3]",
            "onpolicy.prompts.n=64", "onpolicy.progress=false", *extra]


TINY_VIT = "stitchvm-test-tiny-vit"


def write_tiny_open_clip(tmp_path: Path) -> Path:
    """Register a tiny open_clip ViT config as ``TINY_VIT`` (16² images, 4×4 patches, a 4-block vision tower; the
    real BPE tokenizer's vocabulary) and write random weights of it; returns the safetensors file, for configs that
    load CLIPScore.from_pretrained(model_name, pretrained=<file>) such as the SD3.5-M ones."""
    import json

    import open_clip
    from safetensors.torch import save_file

    vision = dict(image_size=16, layers=4, width=32, patch_size=4, head_width=16)
    cfg_path = Path(tmp_path) / f"{TINY_VIT}.json"
    cfg_path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "quick_gelu": True,
                                    "text_cfg": dict(context_length=77, vocab_size=49408, width=16, heads=2,
                                                     layers=1)}))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    weights = Path(tmp_path) / "clip.safetensors"
    model = open_clip.create_model(TINY_VIT)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights
