"""WeightedReward: the total is the weighted sum of the components; differentiable iff all parts are."""

import pytest
import torch

from critics.rewards import Aesthetic, AestheticMLP, CLIPScore, JPEGCompressibility, WeightedReward
from tests.critics.rewards.conftest import EMBED_DIM, char_tokenizer, tiny_open_clip

PROMPTS = ["a red circle", "two blue squares"]


def clip_and_aesthetic() -> WeightedReward:
    torch.manual_seed(0)
    return WeightedReward(
        {
            "clip": (CLIPScore(tiny_open_clip(), char_tokenizer), 2.0),
            "aesthetic": (Aesthetic(tiny_open_clip(seed=1).visual, AestheticMLP(embed_dim=EMBED_DIM)), -0.5),
        }
    )


def test_total_is_weighted_sum_of_components():
    reward = WeightedReward(
        {"clip": (CLIPScore(tiny_open_clip(), char_tokenizer), 2.0), "jpeg": (JPEGCompressibility(), 0.1)}
    )
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        parts = reward.components(images, PROMPTS)
        assert set(parts) == {"clip", "jpeg"}
        torch.testing.assert_close(parts["clip"], CLIPScore(tiny_open_clip(), char_tokenizer)(images, PROMPTS))
        total = reward(images, PROMPTS)
    torch.testing.assert_close(total, 2.0 * parts["clip"] + 0.1 * parts["jpeg"])
    torch.testing.assert_close(reward.combine(parts), total)
    assert total.dtype == torch.float32 and total.shape == (2,)
    assert reward.differentiable is False


def test_differentiable_when_all_parts_are():
    reward = clip_and_aesthetic()
    assert reward.differentiable is True
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(images, PROMPTS).sum().backward()
    grad_total = images.grad.clone()
    images.grad = None
    parts = reward.components(images, PROMPTS)
    (2.0 * parts["clip"] - 0.5 * parts["aesthetic"]).sum().backward()
    torch.testing.assert_close(grad_total, images.grad)
    assert grad_total.abs().sum() > 0


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward({})
    with pytest.raises(ValueError, match=r"\(reward module, weight\) tuple"):
        WeightedReward({"jpeg": JPEGCompressibility()})
    with pytest.raises(ValueError, match="differentiable"):
        WeightedReward({"plain": (torch.nn.Identity(), 1.0)})
    reward = WeightedReward({"jpeg": (JPEGCompressibility(), 1.0)})
    with pytest.raises(ValueError, match=r"expected \['jpeg'\]"):
        reward.combine({"clip": torch.zeros(2)})
    with pytest.raises(ValueError, match="one per image"):
        reward(torch.rand(2, 3, 8, 8), ["only one"])
