"""ShapesEval as a Reward: the Shapes world's pixel checker (shapes/eval.py), one criterion per reward.

    r(x, c) = ShapesEval(x, c).<criterion>    ∈ [0, 1]

``"overall"`` is GenEval-style binary success; ``"count"``, ``"color"``, ``"shape"`` give partial credit and
a denser signal for RL; ``"position"`` is 1.0 for prompts without a relation (N/A). ``"score"`` is the mean of
the criteria that apply, (count + colour + shape [+ position]) / (3 [+ 1]), position only for relation prompts
(the partial-credit score docs/shapes_world.md ranks against; denser than the binary ``overall``). Not
differentiable (connected components on thresholded pixels). Prompts must be Shapes captions; ShapesEval raises ValueError
on anything else, the empty unconditional prompt included.
"""

from __future__ import annotations

import torch
from torch import nn

from critics.rewards.base import check_inputs
from shapes.eval import CRITERIA, ShapesEval

REWARD_CRITERIA = (*CRITERIA, "score")


class ShapesEvalReward(nn.Module):
    """r(x, c) = one criterion of ``shapes.eval.ShapesEval``, (B,) float32 in [0, 1]; no gradient."""

    differentiable = False

    def __init__(self, criterion: str = "overall") -> None:
        """
        Args:
            criterion: one of ``shapes.eval.CRITERIA`` ("count", "color", "shape", "position", "overall") or
                "score" (the mean of the criteria that apply).
        """
        super().__init__()
        if criterion not in REWARD_CRITERIA:
            raise ValueError(f"criterion must be one of {REWARD_CRITERIA}, got {criterion!r}")
        self.criterion = criterion
        self.evaluator = ShapesEval()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], Shapes captions (B,) -> score (B,) float32 on the images' device."""
        check_inputs(images, prompts)
        result = self.evaluator(images, prompts)
        if self.criterion == "score":
            relation = result.has_relation.float()
            return (result.count + result.color + result.shape + relation * result.position) / (3 + relation)
        return getattr(result, self.criterion)
