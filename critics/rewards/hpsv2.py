"""HPSv2: Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341).

An open_clip ViT-H-14 (laion2B-s32B-b79K) finetuned on HPDv2 preference pairs. The official scorer
(``hpsv2/img_score.py``) computes

    HPS(x, c) = <E_img(x) / |E_img(x)|, E_txt(c) / |E_txt(c)|>

i.e. the raw cosine — no ``logit_scale`` and no ×100 (typical values 0.2–0.35). Its evaluation transform is
open_clip's ``image_transform(..., resize_mode="longest")``: resize the longest side to 224, pad to a square
with black, normalise with the OpenAI mean/std. Both are matched here, with differentiable torch ops.

Checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are ``{"state_dict": ...}`` dicts; load
one from disk with ``HPSv2.from_pretrained("ViT-H-14", "/path/HPS_v2.1_compressed.pt")`` — ``torch.load``
runs with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from critics.rewards.clip_score import CLIPScore, Tokenizer


class HPSv2(CLIPScore):
    """HPSv2 score: raw cosine of an HPSv2-finetuned open_clip model, longest-side-resize-and-pad input.

    Same interface as ``CLIPScore`` (``image_embed``, ``text_embed``, ``score_from_embeds``, ``vision``);
    only the scale (1, no clipping) and the resize mode differ.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_mode: str = "longest",
    ) -> None:
        """
        Args:
            model: an open_clip model holding HPSv2 weights (``ViT-H-14``; any config for tests).
            tokenizer: ``tokenizer(list[str]) -> LongTensor (B, L)``; ``open_clip.get_tokenizer("ViT-H-14")``.
            image_size, mean, std: override the model's preprocessing (defaults: 224, OpenAI mean/std).
            resize_mode: ``"longest"`` as HPSv2's evaluation transform.
        """
        super().__init__(
            model,
            tokenizer,
            scale=1.0,
            clip_at_zero=False,
            image_size=image_size,
            mean=mean,
            std=std,
            resize_mode=resize_mode,
        )
