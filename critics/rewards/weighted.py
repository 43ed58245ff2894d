"""Weighted sum of rewards, r(x, c) = Σ_k w_k r_k(x, c) (flow_grpo's multi-reward dict, as one Reward).

``components`` returns each r_k unweighted (what one wants to log as ``reward/<name>``); ``combine`` applies
the weights, so a trainer that logs the parts and optimises the sum scores each image once:

    parts = reward.components(images, prompts)
    total = reward.combine(parts)          # == reward(images, prompts)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from critics.rewards.base import check_inputs


class WeightedReward(nn.Module):
    """Σ_k w_k r_k; differentiable iff every part is.

    Attributes:
        rewards: ``nn.ModuleDict`` name -> reward module.
        weights: name -> weight w_k.
        differentiable: True iff every part is differentiable.
    """

    def __init__(self, rewards: Mapping[str, tuple[nn.Module, float]]) -> None:
        """
        Args:
            rewards: name -> (reward module, weight). Names become log keys and module names (no dots).
        """
        super().__init__()
        if not rewards:
            raise ValueError("WeightedReward needs at least one (reward, weight) pair")
        for name, pair in rewards.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], nn.Module)):
                raise ValueError(f"rewards[{name!r}] must be a (reward module, weight) tuple, got {pair!r}")
            if not isinstance(getattr(pair[0], "differentiable", None), bool):
                raise ValueError(f"rewards[{name!r}] has no bool `differentiable` attribute; is it a Reward?")
        self.rewards = nn.ModuleDict({name: module for name, (module, _) in rewards.items()})
        self.weights = {name: float(weight) for name, (_, weight) in rewards.items()}
        self.differentiable = all(module.differentiable for module in self.rewards.values())

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each reward r_k(images, prompts), unweighted: name -> (B,) float32."""
        check_inputs(images, prompts)
        return {name: module(images, prompts) for name, module in self.rewards.items()}

    def combine(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Σ_k w_k components[k] -> (B,) float32; the keys must be exactly this reward's names."""
        if set(components) != set(self.weights):
            raise ValueError(f"components have keys {sorted(components)}, expected {sorted(self.weights)}")
        return sum(self.weights[name] * components[name] for name in self.weights)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], prompts (B,) -> Σ_k w_k r_k, (B,) float32."""
        return self.combine(self.components(images, prompts))
