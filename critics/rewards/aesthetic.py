"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann 2022).

    r(x) = MLP( E_img(x) / |E_img(x)| )

E_img is OpenAI's CLIP ViT-L/14 image embedding (768-d, after projection); the MLP is five linear layers with
dropout between the first four and no non-linearity (768 → 1024 → 128 → 64 → 16 → 1, dropout 0.2, 0.2, 0.1),
trained with MSE on AVA-style 1–10 ratings (``sac+logos+ava1-l14-linearMSE.pth``). The prompt is ignored.
The head's parameter names (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``) match the
released state dict, so it loads strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from critics.rewards.base import (
    at_least_float32,
    check_images,
    check_inputs,
    embed_pixels,
    freeze,
    module_dtype,
    preprocess,
    tower_preprocess_cfg,
)
from critics.rewards.clip_score import load_open_clip

AESTHETIC_EMBED_DIM = 768  # OpenAI CLIP ViT-L/14 projection width
AESTHETIC_CLIP_MODEL = "ViT-L-14-quickgelu"  # OpenAI's ViT-L/14 uses QuickGELU


class AestheticMLP(nn.Module):
    """The LAION aesthetic head: (B, D) l2-normalised embedding -> (B, 1) score. Linear layers only."""

    def __init__(self, embed_dim: int = AESTHETIC_EMBED_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``); FileNotFoundError if absent."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head weights not found at {path}. Download sac+logos+ava1-l14-linearMSE.pth from "
            "github.com/christophschuhmann/improved-aesthetic-predictor on a machine with network access and "
            "pass its path (a .safetensors conversion works too)."
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class Aesthetic(nn.Module):
    """LAION aesthetic score of an image (prompts ignored); differentiable in the pixels.

    Vision tower and head are frozen (eval mode, ``requires_grad=False``).

    Attributes:
        vision: the CLIP vision tower: an open_clip visual (``model.visual``) or a transformers
            ``CLIPVisionModelWithProjection``; maps preprocessed pixels to the projected embedding.
        head: ``AestheticMLP``.
        preprocess_cfg: input size, mean, std, resize mode (``image_size``, ``mean``, ``std`` mirror it).
        differentiable: True.
    """

    differentiable = True

    def __init__(
        self,
        vision: nn.Module,
        head: AestheticMLP,
        *,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_mode: str | None = None,
    ) -> None:
        """
        Args:
            vision: open_clip visual tower or ``CLIPVisionModelWithProjection`` whose embedding width equals
                ``head.embed_dim``.
            head: the MLP head (load weights before or after; it is frozen here).
            image_size, mean, std, resize_mode: override the tower's preprocessing.
        """
        super().__init__()
        self.vision = freeze(vision)
        self.head = freeze(head)
        self.preprocess_cfg = tower_preprocess_cfg(vision, image_size, mean, std, resize_mode)

    @classmethod
    def from_pretrained(
        cls,
        head_path: str | Path,
        clip_pretrained: str | Path,
        *,
        clip_model_name: str = AESTHETIC_CLIP_MODEL,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        **kwargs,
    ) -> "Aesthetic":
        """Head weights + an open_clip CLIP checkpoint, both local files; never downloads.

        Args:
            head_path: ``sac+logos+ava1-l14-linearMSE.pth`` (or a ``.safetensors`` of the same state dict).
            clip_pretrained: file with OpenAI's ViT-L/14 weights in open_clip format.
            clip_model_name: open_clip architecture of ``clip_pretrained``.
            device, precision: as ``open_clip.create_model``.
            **kwargs: preprocessing overrides for the constructor.
        """
        state = load_state_dict_file(head_path)
        head = AestheticMLP(embed_dim=state["layers.0.weight"].shape[1])
        head.load_state_dict(state, strict=True)
        clip = load_open_clip(clip_model_name, clip_pretrained, device=device, precision=precision)
        return cls(clip.visual, head.to(device), **kwargs)

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

    def score_from_image_embed(self, img_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) image embedding (normalised or not; it is l2-normalised here) -> score (B,) float32."""
        if img_emb.shape[-1] != self.head.embed_dim:
            raise ValueError(
                f"image embedding width {img_emb.shape[-1]} does not match the aesthetic head's input "
                f"{self.head.embed_dim}; the LAION head expects OpenAI CLIP ViT-L/14 embeddings (768)"
            )
        emb = F.normalize(img_emb.to(at_least_float32(img_emb.dtype)), dim=-1).to(module_dtype(self.head))
        return self.head(emb).squeeze(-1).float()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], prompts (B,) (ignored) -> aesthetic score (B,) float32."""
        check_inputs(images, prompts)
        return self.score_from_image_embed(self._image_embed(images))
