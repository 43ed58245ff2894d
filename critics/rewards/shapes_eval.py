"""ShapesEval as a Reward: the Shapes world's pixel checker (shapes/eval.py), one criterion per reward.

    r(x, c) = ShapesEval(x, c).<criterion>    ∈ [0, 1]

``"overall"`` is GenEval-style binary success; ``"count"``, ``"color"``, ``"shape"`` give partial credit and
a denser signal for RL; ``"position"`` is 1.0 for prompts without a relation (N/A). Not differentiable
(connected components on thresholded pixels). Prompts must be Shapes captions; ShapesEval raises ValueError
on anything else, the empty unconditional prompt included.
"""

from __future__ import annotations

import torch
from torch import nn

from critics.rewards.base import check_inputs
from shapes.eval import CRITERIA, ShapesEval


class ShapesEvalReward(nn.Module):
    """r(x, c) = one criterion of ``shapes.eval.ShapesEval``, (B,) float32 in [0, 1]; no gradient."""

    differentiable = False

    def __init__(self, criterion: str = "overall") -> None:
        """
        Args:
            criterion: one of ``shapes.eval.CRITERIA`` ("count", "color", "shape", "position", "overall").
        """
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.criterion = criterion
        self.evaluator = ShapesEval()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], Shapes captions (B,) -> score (B,) float32 on the images' device."""
        check_inputs(images, prompts)
        return getattr(self.evaluator(images, prompts), self.criterion)
