"""benchmarks/steering_gpu.py's graphed Tweedie-DPS baseline computes TweedieGuide's velocity, value and gradient.

The CUDA-graph wrappers themselves are checked on a GPU (tests/policies/test_graphs.py); here they are replaced
by plain calls, so the CPU checks the arithmetic the graphs record."""

import torch

from benchmarks import steering_gpu
from rl.steering.guides import TweedieGuide
from rl.steering.testing import tiny_world

PROMPTS = ["a red circle", "two blue squares to the left of a green star"]


class Eager:
    """Stand-in for GraphedGrad / GraphedNoGrad: the function, called directly."""

    def __init__(self, fn, **_):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def test_graphed_tweedie_baseline_equals_tweedie_guide(monkeypatch):
    monkeypatch.setattr(steering_gpu, "GraphedGrad", Eager)
    monkeypatch.setattr(steering_gpu, "GraphedNoGrad", Eager)
    world = tiny_world(dtype=torch.float64)
    policy = world.policy
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = torch.tensor([0.7, 0.4])
    cond = policy.encode_prompts(PROMPTS)
    ref = TweedieGuide(policy, world.tweedie, 4.5)(z, sigma, cond, PROMPTS)
    out = steering_gpu.GraphedTweedieGuide(policy, world.reward, 4.5)(z, sigma, cond, PROMPTS)
    assert ref.grad.abs().max() > 1e-6
    torch.testing.assert_close(out.value, ref.value, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.grad, ref.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out.velocity, ref.velocity, rtol=1e-10, atol=1e-12)
