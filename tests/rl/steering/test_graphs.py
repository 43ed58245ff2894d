"""CUDA-graph replay of the steering step (rl/steering/graphs.py, SharedHeadGuide cuda_graph="tail"/"full"): the
replayed step computes the eager step's velocity, value and gradient, call after call with new inputs."""

import pytest
import torch

from rl.steering.graphs import GraphedGrad, GraphedNoGrad
from rl.steering.guides import SharedHeadGuide
from rl.steering.testing import tiny_world

PROMPTS = ["a red circle", "two blue squares to the left of a green star"]


def cuda(test):
    """A GPU test: marked ``gpu`` and skipped, with the reason, where no CUDA device is present."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (GPU test)")
    return pytest.mark.gpu(skip(test))


def test_graph_modes_are_checked_on_the_cpu():
    world = tiny_world()
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        SharedHeadGuide(world.policy, world.stitchvm, 4.5, cuda_graph="everything")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        SharedHeadGuide(world.policy, world.stitchvm, 4.5, cuda_graph="full")
    with pytest.raises(ValueError, match="CUDA tensors"):
        GraphedNoGrad(torch.sin)(torch.zeros(2))


@cuda
def test_graphed_functions_replay_with_new_inputs():
    x = torch.randn(3, 5, device="cuda")
    f = GraphedNoGrad(lambda a: (a.sin(), a * 2))
    for _ in range(3):
        x = torch.randn(3, 5, device="cuda")
        s, d = f(x)
        torch.testing.assert_close(s, x.sin())
        torch.testing.assert_close(d, 2 * x)
    w = torch.randn(5, 4, device="cuda")
    g = GraphedGrad(lambda a: ((a @ w).square().sum(1), (a @ w).detach()))
    for _ in range(3):
        leaf = torch.randn(3, 5, device="cuda", requires_grad=True)
        value, hidden = g(leaf)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        torch.testing.assert_close(grad, 2 * (leaf @ w) @ w.T)
        torch.testing.assert_close(hidden, leaf.detach() @ w)


@cuda
@pytest.mark.parametrize("mode", ["tail", "full"])
def test_graphed_guide_equals_eager_guide(mode):
    world = tiny_world()
    policy, critic = world.policy.to("cuda"), world.stitchvm.to("cuda")
    eager, graphed = SharedHeadGuide(policy, critic, 4.5), SharedHeadGuide(policy, critic, 4.5, cuda_graph=mode)
    cond = policy.encode_prompts(PROMPTS)
    kept = []
    for seed in range(3):  # new latents and sigmas each call: the graphs read their inputs, not capture-time copies
        g = torch.Generator("cuda").manual_seed(seed)
        z = torch.randn(2, 4, 8, 8, generator=g, device="cuda")
        sigma = torch.rand(2, generator=g, device="cuda")
        a, b = eager(z, sigma, cond, PROMPTS), graphed(z, sigma, cond, PROMPTS)
        assert a.grad.abs().max() > 1e-6
        torch.testing.assert_close(b.velocity, a.velocity, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.value, a.value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(graphed.values(z, sigma, cond, PROMPTS), a.value, rtol=1e-5, atol=1e-6)
        for need_value in (True, False):  # FK and DPS outside its window: no gradient, with or without V
            c = eager(z, sigma, cond, PROMPTS, need_value=need_value, need_grad=False)
            d = graphed(z, sigma, cond, PROMPTS, need_value=need_value, need_grad=False)
            torch.testing.assert_close(d.velocity, c.velocity, rtol=1e-5, atol=1e-5)
            assert d.grad is None and (d.value is None) == (not need_value)
            if need_value:
                torch.testing.assert_close(d.value, c.value, rtol=1e-5, atol=1e-6)
        kept.append((a.grad, b.grad))
    for a_grad, b_grad in kept:  # an earlier call's gradient is not overwritten by a later replay
        torch.testing.assert_close(b_grad, a_grad, rtol=1e-4, atol=1e-6)
    # the graphs were really used: one capture per graph for the one batch shape
    captures = ([graphed._graphed] if mode == "tail" else
                [graphed._head_graph._graphed, graphed._head_graph_nograd._graphs, graphed._head_stream_graph._graphs,
                 graphed._rest_graph._graphs])
    assert [len(c) for c in captures] == [1] * len(captures)


@cuda
def test_full_graph_without_cfg_runs_the_eager_path():
    world = tiny_world()
    policy, critic = world.policy.to("cuda"), world.stitchvm.to("cuda")
    cond = policy.encode_prompts(PROMPTS)
    z = torch.randn(2, 4, 8, 8, device="cuda")
    sigma = torch.full((2,), 0.5, device="cuda")
    a = SharedHeadGuide(policy, critic, 1.0)(z, sigma, cond, PROMPTS)
    graphed = SharedHeadGuide(policy, critic, 1.0, cuda_graph="full")
    b = graphed(z, sigma, cond, PROMPTS)
    torch.testing.assert_close(b.grad, a.grad)
    assert not graphed._head_graph._graphed  # w = 1: nothing to share, nothing captured


def test_make_guide_refuses_graphs_for_other_guides():
    from rl.steering.guides import make_guide

    world = tiny_world()
    with pytest.raises(ValueError, match="shared-head guide only"):
        make_guide(world.policy, world.tweedie, 4.5, cuda_graph="full")
    with pytest.raises(ValueError, match="shared-head guide only"):
        make_guide(world.policy, world.stitchvm, 4.5, fused=False, cuda_graph="tail")
