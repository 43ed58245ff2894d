"""Pixel reward models: ``reward(images (B, 3, H, W) in [0, 1], prompts: list[str]) -> Tensor (B,)`` float32.

Each is an ``nn.Module`` with a ``differentiable`` attribute (docs/design.md, "Reward"). CLIP-family rewards
also expose the pieces the StitchVM critic reuses: ``vision`` (the vision tower it truncates), the
preprocessing constants (``image_size``, ``mean``, ``std``), ``image_embed(images) -> (B, D)`` and either
``text_embed(prompts) -> (B, D)`` + ``score_from_embeds(img_emb, txt_emb)`` (prompt-dependent) or
``score_from_image_embed(img_emb)`` (aesthetic). Loaders (``from_pretrained``) read local files only.

Configs name these by import path, e.g. ``_component_: critics.rewards.HPSv2.from_pretrained``; there is no
separate name registry.
"""

from critics.rewards.aesthetic import Aesthetic, AestheticMLP
from critics.rewards.base import PreprocessCfg, check_inputs, preprocess
from critics.rewards.clip_score import CLIPScore
from critics.rewards.hpsv2 import HPSv2
from critics.rewards.jpeg import JPEGCompressibility, JPEGIncompressibility
from critics.rewards.pickscore import PickScore
from critics.rewards.shapes_eval import ShapesEvalReward
from critics.rewards.weighted import WeightedReward

__all__ = [
    "Aesthetic",
    "AestheticMLP",
    "CLIPScore",
    "HPSv2",
    "JPEGCompressibility",
    "JPEGIncompressibility",
    "PickScore",
    "PreprocessCfg",
    "ShapesEvalReward",
    "WeightedReward",
    "check_inputs",
    "preprocess",
]
