"""ShapesEvalReward: one criterion of shapes.eval.ShapesEval on rendered Shapes scenes."""

import numpy as np
import pytest
import torch

from critics.rewards import ShapesEvalReward
from shapes.data import caption, parse_caption, render
from shapes.eval import CRITERIA, ShapesEval

PROMPTS = ["two blue squares", "a red circle to the left of a green square"]


def rendered(prompts: list[str]) -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = [render(parse_caption(p), rng) for p in prompts]  # (64, 64, 3) uint8 each
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


# captions the renders of PROMPTS only partly match: one count off, a relation and a shape wrong, so that every
# criterion scores differently (on matching captions every criterion is 1 and a reward of the wrong one would pass)
WRONG = ["three blue squares", "a red circle to the left of a green triangle"]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_equals_shapes_eval(criterion):
    images = rendered(PROMPTS)
    got = ShapesEvalReward(criterion)(images, PROMPTS)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, getattr(ShapesEval()(images, PROMPTS), criterion))
    partial = ShapesEvalReward(criterion)(images, WRONG)
    torch.testing.assert_close(partial, getattr(ShapesEval()(images, WRONG), criterion))
    others = {c: ShapesEvalReward(c)(images, WRONG) for c in CRITERIA if c != criterion}
    assert all(not torch.equal(partial, v) for v in others.values())  # the criterion asked for, not another


def test_rewards_the_right_prompt():
    # A scene of "two blue squares" succeeds for its own caption and fails for another one.
    images = rendered(PROMPTS[:1]).expand(2, -1, -1, -1)
    got = ShapesEvalReward("overall")(images, [caption(parse_caption(PROMPTS[0])), "a yellow star"])
    assert got.tolist() == [1.0, 0.0]


def test_errors():
    assert ShapesEvalReward().differentiable is False
    with pytest.raises(ValueError, match="criterion must be one of"):
        ShapesEvalReward("colour")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ShapesEvalReward()(torch.rand(1, 64, 64, 3), PROMPTS[:1])


def test_score_is_the_mean_of_the_criteria_that_apply():
    # the rendered scenes score 1; on the wrong captions, position only counts for the relation prompt
    images = rendered(PROMPTS)
    assert ShapesEvalReward("score")(images, PROMPTS).tolist() == [1.0, 1.0]
    swapped = list(reversed(PROMPTS))  # scene 0 scored as the relation prompt, scene 1 as "two blue squares"
    r = ShapesEval()(images, swapped)
    want = torch.stack([(r.count[0] + r.color[0] + r.shape[0] + r.position[0]) / 4,
                        (r.count[1] + r.color[1] + r.shape[1]) / 3])
    got = ShapesEvalReward("score")(images, swapped)
    torch.testing.assert_close(got, want)
    assert 0 < got.min() and got.max() < 1  # partial credit, not binary
