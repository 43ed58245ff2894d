"""CLIP score: image-prompt agreement of an open_clip model (Radford et al. 2021; Hessel et al. 2021).

    r(x, c) = s · cos(E_img(x), E_txt(c))        (optionally max(·, 0))

Choice of scale. The metric "CLIPScore" of Hessel et al. is w · max(cos, 0) with w = 2.5, and
torchmetrics reports 100 · max(cos, 0); the clip at 0 zeroes the gradient of every poorly aligned sample,
which is exactly where an RL or guidance signal is needed. The default here is therefore the raw cosine
(``scale=1``, ``clip_at_zero=False``): bounded in [-1, 1], smooth, and the quantity the StitchVM critic
regresses (paper App. D.1 trains on the l2-normalised image embedding). Pass ``scale=100, clip_at_zero=True``
to report the torchmetrics number. The model's learnt ``logit_scale`` is not used: it is a contrastive
training temperature, not part of the score.

Works for any open_clip ``CLIP`` / ``CustomTextCLIP``; the tokenizer is injected (``tokenizer(list[str]) ->
LongTensor (B, L)``) because the Shapes world's CLIP uses its own word-level tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
from torch import nn

from critics.rewards.base import (
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

Tokenizer = Callable[[list[str]], torch.Tensor]


def resolve_local_checkpoint(model_name: str, pretrained: str | Path) -> str:
    """Absolute path of a local checkpoint file, or FileNotFoundError saying how to provide one.

    open_clip treats a known tag ("openai", "laion2b_s32b_b79k") as a download request; this project never
    downloads at run time, so only files are accepted.
    """
    path = Path(pretrained).expanduser().resolve()
    if path.is_file():
        return str(path)
    message = f"no checkpoint file for open_clip model {model_name!r} at {path} (from pretrained={str(pretrained)!r})."
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    if tag_cfg:
        message += (
            f" {str(pretrained)!r} is an open_clip pretrained tag, and tags are never downloaded here: fetch the "
            f"weights on a machine with network access (Hugging Face repo {tag_cfg.get('hf_hub', '?')!r}, "
            "file open_clip_model.safetensors or open_clip_pytorch_model.bin) and pass the file's path as pretrained."
        )
        if tag_cfg.get("quick_gelu", False) and not model_name.endswith("-quickgelu"):
            message += f" These weights use QuickGELU: load them as model_name='{model_name}-quickgelu'."
    else:
        message += " Pass the path of a .safetensors / .pt / .bin open_clip state dict."
    raise FileNotFoundError(message)


def load_open_clip(
    model_name: str, pretrained: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
    pretrained_tag: str | None = None,
) -> nn.Module:
    """An open_clip model with weights from a local file (``torch.load(weights_only=True)`` or safetensors).

    open_clip's loader accepts a bare state dict, ``{"state_dict": ...}`` checkpoints (HPSv2) and a
    ``module.`` prefix from DDP training. Given a file, open_clip knows only the architecture's preprocessing (OpenAI
    mean / std for most); weights published under a tag with their own (e.g. SigLIP's mean 0.5) name it in
    ``pretrained_tag`` — only its preprocessing is read, nothing downloads.
    """
    path = resolve_local_checkpoint(model_name, pretrained)
    model = open_clip.create_model(model_name, pretrained=path, device=device, precision=precision, weights_only=True)
    if pretrained_tag is not None:
        from open_clip.transform import merge_preprocess_dict

        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained_tag)
        if not tag_cfg:
            raise ValueError(f"open_clip knows no pretrained tag {pretrained_tag!r} for {model_name} "
                             f"(its tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
        model.visual.preprocess_cfg = merge_preprocess_dict(model.visual.preprocess_cfg, tag_cfg)
    return model


class CLIPScore(nn.Module):
    """r(x, c) = scale · cos(E_img(x), E_txt(c)), optionally clipped at 0; differentiable in the pixels.

    The wrapped model is frozen (eval mode, ``requires_grad=False``): gradients reach the images, not the
    weights.

    Attributes:
        model: the open_clip model.
        vision: ``model.visual``, the vision tower (patch stem, blocks, ``ln_post``, ``proj``); its output on
            preprocessed pixels is ``image_embed``.
        preprocess_cfg: input size, mean, std and resize mode (``image_size``, ``mean``, ``std`` mirror it).
        differentiable: True.
    """

    differentiable = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        scale: float = 1.0,
        clip_at_zero: bool = False,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_mode: str | None = None,
    ) -> None:
        """
        Args:
            model: an open_clip ``CLIP`` or ``CustomTextCLIP`` (anything with ``.visual`` and ``encode_text``).
            tokenizer: ``tokenizer(list[str]) -> LongTensor (B, L)``, e.g. ``open_clip.get_tokenizer(name)``.
            scale: multiplies the cosine (1 = raw cosine; 100 = torchmetrics' CLIPScore; 2.5 = Hessel et al.).
            clip_at_zero: return max(score, 0) as the CLIPScore metric does (zero gradient below 0).
            image_size, mean, std, resize_mode: override the model's own preprocessing
                (see ``critics.rewards.base``).
        """
        super().__init__()
        self.model = freeze(model)
        self.vision = model.visual
        self.tokenizer = tokenizer
        self.scale = float(scale)
        self.clip_at_zero = bool(clip_at_zero)
        self.preprocess_cfg = tower_preprocess_cfg(model.visual, image_size, mean, std, resize_mode)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: str | Path,
        *,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        pretrained_tag: str | None = None,
        **kwargs,
    ) -> "CLIPScore":
        """Build from an open_clip architecture name and a local weights file; never downloads.

        Args:
            model_name: open_clip architecture, e.g. ``"ViT-L-14-quickgelu"`` for OpenAI's ViT-L/14 weights.
            pretrained: path of the weights file (a tag such as ``"openai"`` raises FileNotFoundError).
            tokenizer: defaults to ``open_clip.get_tokenizer(model_name)`` (the BPE vocabulary ships in the wheel).
            device, precision: as ``open_clip.create_model`` (``"fp32"``, ``"bf16"``, ``"fp16"``, ...).
            pretrained_tag: the open_clip tag the file was published under, for its preprocessing (see
                :func:`load_open_clip`); None: the architecture's.
            **kwargs: passed to the constructor (``scale``, ``clip_at_zero``, preprocessing overrides).
        """
        model = load_open_clip(model_name, pretrained, device=device, precision=precision,
                               pretrained_tag=pretrained_tag)
        return cls(model, tokenizer if tokenizer is not None else open_clip.get_tokenizer(model_name), **kwargs)

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
        tokens = self.tokenizer(list(prompts))
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] != len(prompts):
            raise ValueError(
                f"tokenizer must return a LongTensor (B, L) with B = {len(prompts)}, got "
                f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}; wrap a "
                "transformers tokenizer as lambda p: tok(p, padding='max_length', truncation=True, "
                "max_length=context_length, return_tensors='pt').input_ids"
            )
        device = next(self.model.parameters()).device
        emb = self.model.encode_text(tokens.to(device))
        return emb.to(at_least_float32(emb.dtype))

    def score_from_embeds(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) image and text embeddings (normalised or not) -> reward (B,) float32."""
        score = self.scale * cosine(img_emb, txt_emb)
        return (score.clamp_min(0.0) if self.clip_at_zero else score).float()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], prompts (B,) -> reward (B,) float32."""
        check_inputs(images, prompts)
        return self.score_from_embeds(self._image_embed(images), self.text_embed(prompts))
