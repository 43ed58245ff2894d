"""Shared pieces of the pixel reward models: input checks and differentiable CLIP preprocessing.

Every reward takes images as float tensors (B, 3, H, W) in [0, 1] at any H, W and prompts as ``list[str]``
(docs/design.md). CLIP-family rewards then need the image resized to the tower's input size and normalised
with its mean/std. The reference pipelines (open_clip's ``image_transform``, transformers'
``CLIPImageProcessor``) do this on PIL images, which breaks the autograd graph; here the same geometry is
done with torch ops so that gradients reach the pixels (DPS, DRaFT, distillation targets):

- ``"shortest"``: resize the shortest side to the target, then centre crop (OpenAI CLIP, PickScore).
- ``"longest"``: resize the longest side to the target, then pad with black (0) to a square (HPSv2's
  ``ResizeMaxSize``, open_clip's ``resize_mode="longest"``).
- ``"squash"``: resize both sides to the target, ignoring the aspect ratio.

Resizing is bicubic (or bilinear, where a tower asks for it) with antialiasing, as torchvision's ``Resize``
on tensors. The PIL reference works on
uint8 pixels, so it differs from this by the 1/255 quantisation and PIL's clamping of bicubic overshoot.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModelWithProjection

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class PreprocessCfg:
    """How a CLIP vision tower wants its pixels.

    Attributes:
        image_size: (height, width) of the tower's input.
        mean: per-channel mean subtracted after resizing (images in [0, 1]).
        std: per-channel standard deviation divided by after subtracting the mean.
        resize_mode: one of ``RESIZE_MODES`` (see the module docstring).
        interpolation: one of ``INTERPOLATIONS``.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.image_size) != 2 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(
                f"expected image_size (H, W) and 3-channel mean/std, got image_size={self.image_size}, "
                f"mean={self.mean}, std={self.std}"
            )


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` -> ``(224, 224)``."""
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a float (B, 3, H, W) tensor in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point tensor (B, 3, H, W) in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W), got {tuple(images.shape)}; "
            "channels-last (B, H, W, 3) images need images.permute(0, 3, 1, 2)"
        )
    if images.numel() > 0:
        lo, hi = torch.aminmax(images.detach())
        # Written so that NaN fails the check as well.
        if not (lo.item() >= 0.0 and hi.item() <= 1.0):
            raise ValueError(
                f"images must lie in [0, 1], got min {lo.item():.4g}, max {hi.item():.4g}; "
                "map VAE outputs in [-1, 1] with (x / 2 + 0.5).clamp(0, 1)"
            )


def check_prompts(prompts: Sequence[str], batch_size: int) -> None:
    """Raise ValueError unless ``prompts`` is a list of ``batch_size`` strings."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list[str] with one prompt per image")
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch_size} images; need one per image")


def check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise ValueError unless ``images`` is a float (B, 3, H, W) tensor in [0, 1] with one prompt per image."""
    check_images(images)
    check_prompts(prompts, images.shape[0])


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)


def _center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Offsets rounded as torchvision's CenterCrop does.
    height, width = images.shape[-2:]
    top = int(round((height - size[0]) / 2.0))
    left = int(round((width - size[1]) / 2.0))
    return images[..., top : top + size[0], left : left + size[1]]


def _shortest_side_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    if target[0] == target[1]:
        # torchvision Resize(int): the short side becomes the target, the long side is floored.
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(target[0] * long / short)
        return (target[0], new_long) if height <= width else (new_long, target[0])
    # open_clip's ResizeKeepRatio(longest=0) for a non-square target.
    ratio = min(height / target[0], width / target[1])
    return (round(height / ratio), round(width / ratio))


def resize_to_tower(images: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    """Resize (B, 3, H, W) images in [0, 1] to ``cfg.image_size`` (no normalisation); differentiable."""
    target = cfg.image_size
    height, width = images.shape[-2:]
    if cfg.resize_mode == "squash":
        return _resize(images, target, cfg.interpolation)
    if cfg.resize_mode == "shortest":
        resized = _resize(images, _shortest_side_size(height, width, target), cfg.interpolation)
        return _center_crop(resized, target)
    # "longest": scale so the image fits, then pad with 0 (black) symmetrically, extra pixel right/bottom.
    ratio = max(height / target[0], width / target[1])
    new_height, new_width = min(round(height / ratio), target[0]), min(round(width / ratio), target[1])
    resized = _resize(images, (new_height, new_width), cfg.interpolation)
    pad_h, pad_w = target[0] - new_height, target[1] - new_width
    return F.pad(resized, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def preprocess(images: torch.Tensor, cfg: PreprocessCfg, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> normalised tower input (B, 3, *cfg.image_size); differentiable.

    Resizing runs in at least float32 (bicubic in half precision is not available on every backend; float64
    stays float64 for gradient checks); the result is cast to ``dtype`` (the tower's dtype) at the end.
    """
    pixels = resize_to_tower(images.to(at_least_float32(images.dtype)), cfg)
    mean = channel_constants(tuple(cfg.mean), pixels.dtype, pixels.device)
    std = channel_constants(tuple(cfg.std), pixels.dtype, pixels.device)
    pixels = (pixels - mean) / std
    return pixels if dtype is None else pixels.to(dtype)


@functools.lru_cache(maxsize=None)
def channel_constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) per-channel constants, made once per (values, dtype, device): no host-to-device copy per call,
    which also lets a CUDA graph capture the preprocessing (policies/graphs.py). Never evicted: a captured graph
    reads the tensor by address (a few bytes per reward model, dtype and device). Made outside inference mode: a
    cached inference tensor, saved for backward by a later differentiable call, would be an error there."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(1, len(values), 1, 1)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


def tower_preprocess_cfg(
    vision: nn.Module,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_mode: str | None = None,
) -> PreprocessCfg:
    """The preprocessing a vision tower expects; explicit arguments override it.

    open_clip towers carry it in ``visual.preprocess_cfg`` when built by ``create_model``; a tower built from a
    config directly, and a transformers ``CLIPVisionModelWithProjection`` (whose processor is a separate
    object), only know their input size, and the OpenAI mean/std with ``"shortest"`` resizing are assumed.
    """
    if isinstance(vision, CLIPVisionModelWithProjection):
        cfg = {"size": vision.config.image_size}
    else:
        cfg = open_clip.get_model_preprocess_cfg(vision)
    return PreprocessCfg(
        image_size=as_size(image_size if image_size is not None else cfg["size"]),
        mean=tuple(float(m) for m in (mean if mean is not None else cfg.get("mean", OPENAI_CLIP_MEAN))),
        std=tuple(float(s) for s in (std if std is not None else cfg.get("std", OPENAI_CLIP_STD))),
        resize_mode=resize_mode if resize_mode is not None else cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


def embed_pixels(vision: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Preprocessed pixels (B, 3, h, w) -> projected, unnormalised image embedding (B, D), at least float32.

    ``vision`` is an open_clip visual tower (its forward returns the projected pooled embedding) or a
    transformers ``CLIPVisionModelWithProjection`` (``.image_embeds``).
    """
    if isinstance(vision, CLIPVisionModelWithProjection):
        emb = vision(pixel_values=pixels).image_embeds
    else:
        emb = vision(pixels)
    return emb.to(at_least_float32(emb.dtype))


def module_dtype(module: nn.Module) -> torch.dtype:
    """dtype of the first floating-point parameter of ``module`` (float32 if there is none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: a reward is a fixed function (gradients still reach the pixels)."""
    module.eval()
    module.requires_grad_(False)
    return module


def cosine(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (B, D) and (B, D) embeddings -> (B,), at least float32."""
    if img_emb.shape != txt_emb.shape:
        raise ValueError(f"image and text embeddings must have the same shape, got {tuple(img_emb.shape)} "
                         f"and {tuple(txt_emb.shape)}")
    dtype = at_least_float32(torch.promote_types(img_emb.dtype, txt_emb.dtype))
    return (F.normalize(img_emb.to(dtype), dim=-1) * F.normalize(txt_emb.to(dtype), dim=-1)).sum(-1)
