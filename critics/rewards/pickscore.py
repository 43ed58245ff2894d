"""PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569).

A transformers ``CLIPModel`` (CLIP-H, finetuned on Pick-a-Pic preferences). The reference scorer (model card,
``yuvalkirstain/PickScore``) computes

    PickScore(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c))

(typical values 18–23), with the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor: resize the shortest
side to 224 (bicubic), centre crop 224, normalise with the OpenAI mean/std; text padded and truncated to 77
tokens. The image side is redone here with differentiable torch ops (``critics.rewards.base``).

``vision`` is a ``CLIPVisionModelWithProjection`` assembled from the ``CLIPModel``'s own ``vision_model`` and
``visual_projection`` (shared, not copied), so it maps preprocessed pixels to the projected embedding as the
other CLIP rewards' towers do.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

from critics.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    at_least_float32,
    check_images,
    check_inputs,
    check_prompts,
    cosine,
    embed_pixels,
    freeze,
    module_dtype,
    preprocess,
    tower_preprocess_cfg,
)

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def vision_with_projection(model: CLIPModel) -> CLIPVisionModelWithProjection:
    """A ``CLIPVisionModelWithProjection`` whose children *are* ``model.vision_model`` and ``model.visual_projection``.

    Shared, not copied: finetuning or truncating ``vision`` acts on the CLIPModel's own tower.
    """
    config = copy.deepcopy(model.config.vision_config)
    config.projection_dim = model.config.projection_dim
    # Built on the meta device so the throwaway random tower costs no memory; both children are replaced.
    with torch.device("meta"):
        tower = CLIPVisionModelWithProjection(config)
    tower.vision_model = model.vision_model
    tower.visual_projection = model.visual_projection
    return tower.eval()


def read_processor_constants(processor_dir: str | Path) -> dict:
    """``{"image_size", "mean", "std"}`` from a transformers ``preprocessor_config.json``, or {} if there is none."""
    path = Path(processor_dir) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    crop = cfg.get("crop_size", cfg.get("size"))
    if isinstance(crop, dict):
        crop = (crop["height"], crop["width"]) if "height" in crop else crop.get("shortest_edge")
    out = {"mean": cfg.get("image_mean"), "std": cfg.get("image_std"), "image_size": crop}
    return {k: v for k, v in out.items() if v is not None}


class PickScore(nn.Module):
    """r(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c)) of a transformers CLIPModel; differentiable in x.

    The wrapped model is frozen (eval mode, ``requires_grad=False``).

    Attributes:
        vision: ``CLIPVisionModelWithProjection`` sharing the CLIPModel's vision tower and projection.
        text_model, text_projection, logit_scale: the CLIPModel's text side and temperature.
        preprocess_cfg: input size, mean, std, resize mode (``image_size``, ``mean``, ``std`` mirror it).
        differentiable: True.
    """

    differentiable = True

    def __init__(
        self,
        model: CLIPModel,
        tokenizer,
        *,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_mode: str = "shortest",
        max_length: int | None = None,
    ) -> None:
        """
        Args:
            model: a transformers ``CLIPModel`` with PickScore weights (any config for tests).
            tokenizer: a transformers tokenizer: ``tokenizer(list[str], padding=True, truncation=True,
                max_length=L, return_tensors="pt")`` returns ``input_ids`` (and ``attention_mask``).
            image_size: tower input size (default: ``model.config.vision_config.image_size``).
            mean, std: normalisation (default: OpenAI CLIP's, as the CLIP-ViT-H-14 processor).
            resize_mode: ``"shortest"`` (resize + centre crop) as ``CLIPImageProcessor``.
            max_length: token budget (default: the text tower's ``max_position_embeddings``, 77 for CLIP).
        """
        super().__init__()
        freeze(model)
        self.vision = vision_with_projection(model)
        self.text_model = model.text_model
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.tokenizer = tokenizer
        self.max_length = int(max_length or model.config.text_config.max_position_embeddings)
        self.preprocess_cfg = tower_preprocess_cfg(
            self.vision,
            image_size,
            mean if mean is not None else OPENAI_CLIP_MEAN,
            std if std is not None else OPENAI_CLIP_STD,
            resize_mode,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        processor_path: str | Path | None = None,
        local_files_only: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> "PickScore":
        """Load a PickScore ``CLIPModel`` from a local directory (``config.json`` + weights).

        Args:
            path: directory of the model (e.g. a snapshot of ``yuvalkirstain/PickScore_v1``).
            processor_path: directory holding the tokenizer files and ``preprocessor_config.json`` (the
                reference uses ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s); defaults to ``path``. Without a
                ``preprocessor_config.json`` the tower's image size and the OpenAI mean/std are used.
            local_files_only: keep True: with False, a hub id would be downloaded.
            device, dtype: where and in which precision to hold the model.
            **kwargs: passed to the constructor (preprocessing overrides, ``max_length``).
        """
        processor_path = path if processor_path is None else processor_path
        if local_files_only:
            for what, where in (("model", path), ("processor", processor_path)):
                if not Path(where).is_dir():
                    raise FileNotFoundError(
                        f"PickScore {what} directory not found: {Path(where).resolve()}. Download "
                        "yuvalkirstain/PickScore_v1 (model) and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer + "
                        "preprocessor_config.json) on a machine with network access, e.g. with "
                        "`huggingface-cli download <repo> --local-dir <dir>`, and pass the directories."
                    )
        model = CLIPModel.from_pretrained(path, local_files_only=local_files_only, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(processor_path, local_files_only=local_files_only)
        constants = read_processor_constants(processor_path) if Path(processor_path).is_dir() else {}
        return cls(model, tokenizer, **{**constants, **kwargs})

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocess_cfg.image_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocess_cfg.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocess_cfg.std

    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> unnormalised projected image embedding (B, D), at least float32."""
        check_images(images)
        return self._image_embed(images)

    def _image_embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images, self.preprocess_cfg, dtype=module_dtype(self.vision))  # (B, 3, h, w)
        return embed_pixels(self.vision, pixels)

    def text_embed(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (B,) -> unnormalised projected text embedding (B, D), at least float32."""
        check_prompts(prompts, len(prompts))
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = self.text_projection.weight.device
        pooled = self.text_model(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device) if "attention_mask" in tokens else None,
        ).pooler_output  # (B, D_text), the EOS-token state after the final layer norm
        emb = self.text_projection(pooled)
        return emb.to(at_least_float32(emb.dtype))

    def score_from_embeds(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) image and text embeddings -> exp(logit_scale) · cos, (B,) float32."""
        cos = cosine(img_emb, txt_emb)
        return (self.logit_scale.to(cos.dtype).exp() * cos).float()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], prompts (B,) -> reward (B,) float32."""
        check_inputs(images, prompts)
        return self.score_from_embeds(self._image_embed(images), self.text_embed(prompts))
