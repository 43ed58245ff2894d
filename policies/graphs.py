"""CUDA-graph replay: the steering step's fixed-shape pieces, and the policy's no-grad forwards.

A guided step at batch 1 runs thousands of small kernels (adaLN modulations, RMS qk-norms, the reward tail's 24
blocks of 257 tokens, and their backward). Eager PyTorch launches each from Python; when a kernel is shorter than
its launch, the GPU waits on the CPU. A CUDA graph records the kernels of one call once and replays them with one
launch. Two wrappers, one capture per input signature (shapes, dtypes, devices, requires_grad):

    GraphedNoGrad(fn)        fn(*tensors) -> tensor | tuple of tensors, no autograd (V(z) forward, the CFG
                             velocity, the no-grad rest of a split CFG forward)
    GraphedGrad(fn)          the same with autograd: torch.cuda.make_graphed_callables records fn's forward and its
                             backward to the inputs that require grad (the value gradient w.r.t. z)
    StateGraphs(fn)          GraphedNoGrad per model state (FlowPolicy.enable_cuda_graphs: rollouts, evaluation and
                             the KL reference of a trainer whose weights change between calls)

Rules a captured function obeys (checked by the tests on the shapes they use): it reads its inputs only through
its tensor arguments (anything else, such as the prompt embeddings closed over, is frozen at capture: key the
cache on it or keep it outside the graph), it does not synchronise with the host, and its outputs are the graph's
static buffers, overwritten by the next replay. GraphedNoGrad therefore returns clones; GraphedGrad returns the
static outputs (valid until the next call) and the caller clones what it keeps (SharedHeadGuide clones ∇V). A
captured graph also reads any tensor it closed over by address (cached constants such as
critics.rewards.base.channel_constants): such caches must never evict.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch
from torch import Tensor


CUDA_GRAPH_MODES = (None, "tail", "full")  # rl.steering.guides.SharedHeadGuide's cuda_graph


def signature(args: tuple[Tensor, ...], with_grad: bool = True) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) + ((a.requires_grad,) if with_grad else ()) for a in args)


def _check_cuda(args: tuple[Tensor, ...]) -> None:
    bad = [a.device for a in args if a.device.type != "cuda"]
    if bad:
        raise ValueError(f"CUDA-graph replay needs CUDA tensors; got an input on {bad[0]}")


class GraphedNoGrad:
    """Replay ``fn(*args)`` (no autograd) as a CUDA graph: one capture per input signature, outputs cloned."""

    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], object]] = {}

    def _capture(self, args: tuple[Tensor, ...]):
        static = tuple(a.detach().clone() for a in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up outside the graph (cuBLAS handles, autotuning)
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = self.fn(*static)
        return graph, static, out

    def __call__(self, *args: Tensor):
        _check_cuda(args)
        key = signature(args, with_grad=False)  # runs under no_grad: requires_grad of an input changes nothing
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        graph, static, out = self._graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()


class GraphedGrad:
    """Replay ``fn(*args)`` and its backward as CUDA graphs (``torch.cuda.make_graphed_callables``).

    Outputs may be detached inside ``fn`` (hidden states handed on), but every output comes back through the
    graphed autograd Function with ``requires_grad`` set: detach what is not differentiated. Outputs are the
    graph's static buffers: use them before the next call, clone what is kept.
    """

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], warmup: int = 3):
        self.fn, self.warmup = fn, warmup
        self._graphed: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        _check_cuda(args)
        key = signature(args)
        if key not in self._graphed:
            sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            self._graphed[key] = torch.cuda.make_graphed_callables(self.fn, sample, num_warmup_iters=self.warmup)
        return self._graphed[key](*args)


class StateGraphs:
    """``GraphedNoGrad(fn)`` per model state: replay a module's no-grad forward while its weights train.

    A captured graph reads the parameters by address and freezes every Python-level branch taken at capture (which
    LoRA adapter is active, whether adapters are disabled, train or eval mode, autocast). The caller passes a
    ``state`` key naming all of that (FlowPolicy._graph_state: adapter flags, mode, autocast, the parameters'
    storage addresses); in-place updates (AdamW, the EMA's lerp_, load_state_dict) keep the addresses, so a trained
    adapter replays one graph per input shape for the whole run, while any change a graph would miss selects
    another. The ``capacity`` most recently used states are kept (each holds its graphs' private memory pools).
    """

    def __init__(self, fn: Callable[..., Tensor], capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.fn, self.capacity = fn, capacity
        self._by_state: OrderedDict[Hashable, GraphedNoGrad] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_state)

    def __call__(self, state: Hashable, *args: Tensor) -> Tensor:
        graphed = self._by_state.pop(state, None)
        if graphed is None:
            graphed = GraphedNoGrad(self.fn)
        self._by_state[state] = graphed  # most recently used last
        while len(self._by_state) > self.capacity:
            self._by_state.popitem(last=False)
        return graphed(*args)
