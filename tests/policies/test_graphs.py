"""CUDA-graph replay of the steering step (policies/graphs.py, SharedHeadGuide cuda_graph="tail"/"full"): the
replayed step computes the eager step's velocity, value and gradient, call after call with new inputs."""

import pytest
import torch

from policies.graphs import GraphedGrad, GraphedNoGrad
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


# ------------------------------------------------------------------ the policy's no-grad forwards (run.cuda_graphs)
class _Counting:
    """Stand-in for GraphedNoGrad: counts the captures a StateGraphs makes and calls the function directly."""

    made = 0

    def __init__(self, fn):
        type(self).made += 1
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def test_state_graphs_capture_once_per_state_and_keep_the_most_recent(monkeypatch):
    from policies import graphs

    monkeypatch.setattr(graphs, "GraphedNoGrad", _Counting)
    _Counting.made = 0
    cache = graphs.StateGraphs(lambda x: x + 1, capacity=2)
    x = torch.zeros(3)
    assert torch.equal(cache("a", x), x + 1) and torch.equal(cache("a", x), x + 1)
    assert _Counting.made == 1 and len(cache) == 1  # one state: one capture, replayed
    cache("b", x)
    cache("a", x)  # "a" becomes the most recently used
    cache("c", x)  # over capacity: "b", the least recently used, goes
    assert _Counting.made == 3 and len(cache) == 2
    cache("a", x)
    assert _Counting.made == 3  # "a" was kept
    cache("b", x)
    assert _Counting.made == 4  # "b" was evicted: captured again
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        graphs.StateGraphs(torch.sin, capacity=0)


def _lora_policy():
    from policies import lora
    from policies.testing import tiny_policy

    policy = tiny_policy()
    spec = lora.LoraSpec(r=4, alpha=8)
    lora.add_lora(policy.transformer, spec, "default")
    lora.add_lora(policy.transformer, spec, "ema")
    lora.set_active(policy.transformer, "default")
    return policy


def test_graph_state_names_what_a_capture_would_freeze():
    """Every change a replayed forward would miss changes the key; in-place weight updates (AdamW, the EMA, a
    state-dict load) do not, so a trained adapter keeps replaying its captures."""
    from policies import lora

    policy = _lora_policy()
    t = policy.transformer
    base = policy._graph_state()
    assert policy._graph_state() == base
    with torch.no_grad():
        for p in lora.adapter_parameters(t, "default").values():
            p.add_(0.1)  # an optimizer step
    lora.ema_update(t, "default", "ema", 0.9)
    lora.load_adapter_state_dict(t, lora.adapter_state_dict(t, "default"), "default")
    assert policy._graph_state() == base
    with lora.reference_policy(t):
        assert policy._graph_state() != base  # adapters disabled: the KL reference
    with lora.using_adapter(t, "ema"):
        assert policy._graph_state() != base  # another adapter (evaluation of the EMA)
    assert policy._graph_state() == base
    mode = t.training
    t.train(not mode)
    assert policy._graph_state() != base  # train / eval mode (dropout)
    t.train(mode)
    assert policy._graph_state() == base
    p = next(iter(lora.adapter_parameters(t, "default").values()))
    p.data = p.data.clone()  # a replaced tensor: a capture would read the old storage
    assert policy._graph_state() != base


def test_graphs_leave_cpu_forwards_eager():
    # (autograd forwards on the GPU: test_policy_graphs_equal_eager_forwards_while_the_adapter_trains)
    policy = _lora_policy()
    policy.enable_cuda_graphs()
    assert policy.cuda_graphs
    calls = []
    policy._graphs = lambda *args: calls.append(args)  # would record any routed call
    cond = policy.encode_prompts(PROMPTS)
    z = policy.noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = policy.velocity(z, 0.5, cond)
    assert calls == [] and v.shape == z.shape  # a CPU forward runs eagerly
    policy.enable_cuda_graphs(False)
    assert not policy.cuda_graphs


@cuda
def test_policy_graphs_equal_eager_forwards_while_the_adapter_trains():
    """A trainer's sequence on the GPU: rollouts (no grad), an optimizer step, the EMA, the KL reference, the EMA
    adapter's evaluation -- each replayed forward equals the eager one, and autograd forwards stay eager."""
    from policies import lora, samplers

    policy = _lora_policy().to("cuda")
    t = policy.transformer
    params = list(lora.adapter_parameters(t, "default").values())
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    cond = policy.encode_prompts(PROMPTS)
    sigmas = policy.sigmas(6, "cuda")

    def sample():
        z_T = policy.noise(2, torch.Generator("cuda").manual_seed(0))
        with torch.no_grad():
            return samplers.sample(policy.velocity_fn(cond, 4.5), z_T, sigmas).z_tau

    def both():
        policy.enable_cuda_graphs(False)
        eager = sample()
        policy.enable_cuda_graphs(True)
        return eager, sample(), sample()

    graphs_before = None
    for step in range(3):
        eager, replayed, again = both()
        torch.testing.assert_close(replayed, eager)
        torch.testing.assert_close(again, eager)
        with lora.reference_policy(t):
            eager_ref, replayed_ref, _ = both()
        torch.testing.assert_close(replayed_ref, eager_ref)
        assert not torch.allclose(eager_ref, eager)  # the reference really is another model
        with lora.using_adapter(t, "ema"):
            eager_ema, replayed_ema, _ = both()
        torch.testing.assert_close(replayed_ema, eager_ema)
        # an autograd forward (the re-scoring) stays eager and carries the graph of v_theta
        z = torch.randn(2, 4, 8, 8, device="cuda")
        v = policy.velocity(z, torch.full((2,), 0.5, device="cuda"), cond)
        assert v.requires_grad
        v.square().mean().backward()
        torch.optim.SGD(params, lr=0.5).step()  # in place: the captures stay valid
        lora.ema_update(t, "default", "ema", 0.5)
        for p in params:
            p.grad = None
    assert 1 <= len(policy._graphs) <= 3
