"""Guides: one call that gives a steering step what it needs at z_t — the CFG velocity, V(z_t) and ∇_z V(z_t).

    guide(z_t, sigma, cond, prompts, need_value, need_grad) -> GuideOutput(velocity, value, grad)
    guide.values(z, sigma, cond, prompts)                   -> V(z), no gradient (FK proposals, final pick)

The velocity is always the policy's classifier-free-guided velocity evaluated without gradients; the value
gradient never flows into it (docs: rl/steering/dps.py). Three implementations, same numbers, different cost:

    guide              value model          what one guided call runs
    CriticGuide        any Critic           CFG forward (2B rows, no grad) + critic.value with autograd
                                            (Tweedie: a second DiT forward + VAE decode + reward, all backpropagated;
                                            StitchVM: head of i blocks + stitch + tail, backpropagated)
    SharedHeadGuide    StitchVM             the CFG forward itself, split at block i: the unconditional half's
                                            blocks 1..i run once with autograd and ARE the StitchVM head
                                            (null text, same weights); their block-i tokens feed the stitch +
                                            tail for V and are then detached and continue through blocks
                                            i+1..N with the conditional half, without gradients. A
                                            prompt-conditioned head (critics/stitchvm.py) is the *conditional*
                                            half's blocks 1..i instead (eager only)
    TweedieGuide       TweedieCritic        the CFG forward split by halves: the conditional half runs with
                                            autograd and is the Tweedie denoiser (z_hat_0 = z - sigma v_c), the
                                            unconditional half without; then VAE decode + reward, backpropagated

SharedHeadGuide's extra work over a plain CFG step is the backward through i blocks of B rows and the
stitch + tail forward/backward: the "floor" of value-guided sampling. Parameters are never differentiated
(``torch.autograd.grad`` w.r.t. z only), so no weight-gradient buffers are allocated.

Validity of the shared head: the StitchVM head (critics/stitchvm.py, DiTHead) is the policy transformer's own first
i blocks on base weights with the null-text conditioning. SharedHeadGuide therefore checks, at construction, that
the critic's head modules are the policy transformer's (same objects), that no peft adapter is enabled in them
(a LoRA-tuned policy's unconditional branch is not the critic's head: use CriticGuide), and that the critic's
null-text embeddings equal the policy's empty-prompt embeddings (which it then uses as CFG's unconditional
conditioning, so the velocity is exactly ``policy.velocity``).

Timestep convention: every guide passes ``sigma * 1000`` in float32, as ``FlowPolicy.velocity`` does.
``DiTHead.forward_taps`` casts sigma to the backbone dtype first, so in bf16 its value can differ from the
shared path by the bf16 rounding of sigma (in float32/float64 they agree to rounding; see the report of issue #7).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from critics.baselines import TweedieCritic
from critics.stitchvm import NULL_COND_RTOL, StitchVM
from policies import graphs
from policies.flow import FlowPolicy, PromptEmbeds
from policies.graphs import CUDA_GRAPH_MODES
from rl.steering import mmdit


class GuideOutput(NamedTuple):
    """What a steering step gets at z_t.

    Attributes:
        velocity: (B, C, h, w) CFG velocity v(z_t), in the policy dtype, no gradient.
        value: (B,) float32 V(z_t), detached; None when not asked for.
        grad: (B, C, h, w) ∇_z V(z_t), float32 (float64 for float64 latents); None when not asked for.
    """

    velocity: Tensor
    value: Tensor | None
    grad: Tensor | None


class Guide(Protocol):
    def __call__(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str], need_value: bool = True,
                 need_grad: bool = True) -> GuideOutput: ...

    def values(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str]) -> Tensor: ...


def sigma_batch(sigma: Tensor | float, z: Tensor) -> Tensor:
    """sigma as a (B,) float32 tensor on z's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=z.device)
    sigma = sigma.expand(z.shape[0]) if sigma.ndim == 0 else sigma
    if sigma.shape != (z.shape[0],):
        raise ValueError(f"sigma must be a float or have shape ({z.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def grad_leaf(z: Tensor) -> Tensor:
    """A leaf copy of z, at least float32, that requires grad: the value gradient is taken w.r.t. it (a bf16 policy
    still gets a float32 gradient; float64 tests keep float64)."""
    return z.detach().to(torch.promote_types(z.dtype, torch.float32)).requires_grad_(True)


def grad_of(value: Tensor, leaf: Tensor) -> Tensor:
    """∇_leaf sum(value), in the leaf's dtype; zeros when the value does not depend on the leaf (a constant critic).

    Samples are independent (no op mixes batch rows), so the gradient of the sum is the per-sample gradient.
    """
    if not value.requires_grad:
        return torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    return torch.zeros_like(leaf) if grad is None else grad


def cfg_combine(v_u: Tensor, v_c: Tensor, guidance_scale: float) -> Tensor:
    """v = v_u + w (v_c - v_u), in the same dtype and order as ``FlowPolicy.velocity``."""
    return v_u + guidance_scale * (v_c - v_u)


# ---------------------------------------------------------------------------------------------------------------
# Any critic: the velocity and the value computed separately
# ---------------------------------------------------------------------------------------------------------------
class CriticGuide:
    """CFG velocity from the policy, V and ∇V from ``critic.value`` (any Critic; ∇V needs a differentiable one).

    Args:
        policy: the flow policy that samples.
        critic: value model, ``value(z_t, sigma, prompts) -> (B,)``.
        guidance_scale: CFG weight w of the velocity.
    """

    def __init__(self, policy: FlowPolicy, critic, guidance_scale: float):
        self.policy, self.critic, self.guidance_scale = policy, critic, float(guidance_scale)

    def __call__(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str], need_value: bool = True,
                 need_grad: bool = True) -> GuideOutput:
        sigma = sigma_batch(sigma, z)
        with torch.no_grad():
            v = self.policy.velocity(z, sigma, cond, self.guidance_scale)
        value = grad = None
        if need_grad:
            leaf = grad_leaf(z)
            with torch.enable_grad():
                value = self.critic.value(leaf, sigma, list(prompts)).float()
                if not value.requires_grad:
                    raise ValueError(f"{type(self.critic).__name__}.value is not differentiable in z_t (no autograd "
                                     f"graph): value guidance needs a differentiable critic (stitchvm, tweedie)")
                grad = grad_of(value, leaf)
            value = value.detach()
        elif need_value:
            value = self.values(z, sigma, cond, prompts)
        return GuideOutput(v, value, grad)

    @torch.no_grad()
    def values(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str]) -> Tensor:
        return self.critic.value(z, sigma_batch(sigma, z), list(prompts)).float()


# ---------------------------------------------------------------------------------------------------------------
# StitchVM: the head is CFG's unconditional branch
# ---------------------------------------------------------------------------------------------------------------
def embed_from_block_tokens(critic: StitchVM, height: int, width: int, hidden: Tensor) -> Tensor:
    """Stitch + tail on the head's block-i image tokens (B, N, D_dit) -> image embedding (B, E)."""
    return critic.features_from_head(critic.head.features_from_block_outputs(hidden, height, width)).embed


def _enabled_adapter_layers(module: torch.nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in module.named_modules()
            if isinstance(m, BaseTunerLayer) and not m.disable_adapters and m.active_adapters]


class SharedHeadGuide:
    """CFG velocity, V and ∇V from one split pass of the policy transformer (StitchVM critics only).

    Args:
        policy: the flow policy; its transformer must be the one the critic's head was built on.
        critic: a StitchVM whose head shares the policy transformer's modules.
        guidance_scale: CFG weight w. With w = 1 there is no unconditional branch to share: the head then runs on
            its own (B rows, i blocks) next to the conditional forward, as in CriticGuide.
        cuda_graph: None (eager), "tail" or "full" (CUDA only; policies/graphs.py). "tail" replays the stitch
            + tail forward and backward of the gradient path as CUDA graphs: at batch 1 the ~24-block reward tail
            is bound by kernel-launch overhead, not by the GPU. "full" replays the whole step as three graphs: the
            head's i blocks + stitch + tail with their backward to z, the no-grad rest of the CFG forward (on a
            side stream, overlapping that backward), and ``values``; only the prompt scoring (cached text
            embeddings) and the CFG combination run eagerly. One capture per input shape; the conditioning is a
            graph input (copied in), never frozen. With w = 1 there is no unconditional branch to share and
            "full" runs the eager path.
    """

    def __init__(self, policy: FlowPolicy, critic: StitchVM, guidance_scale: float, cuda_graph: str | None = None):
        if not isinstance(critic, StitchVM):
            raise TypeError(f"SharedHeadGuide needs a StitchVM critic, got {type(critic).__name__}; use CriticGuide")
        # which CFG half the head is: the unconditional one (null text, the paper's head) or the conditional one
        self.branch = "cond" if critic.head_conditioning == "prompt" else "uncond"
        if self.branch == "cond" and cuda_graph is not None:
            raise ValueError(f"cuda_graph={cuda_graph!r} replays the null-text head; this StitchVM's head is "
                             f"prompt-conditioned (it shares CFG's conditional half, eagerly): set cuda_graph: null")
        transformer, head = policy.transformer, critic.head
        shared = (head.pos_embed is transformer.pos_embed and head.time_text_embed is transformer.time_text_embed
                  and head.context_embedder is transformer.context_embedder
                  and all(a is b for a, b in zip(head.transformer_blocks, transformer.transformer_blocks)))
        if not shared:
            raise ValueError("the StitchVM head is not built on this policy's transformer (its modules are other "
                             "objects): build or load the critic around policy.transformer to share the head")
        lora = _enabled_adapter_layers(torch.nn.ModuleList([transformer.pos_embed, transformer.time_text_embed,
                                                            transformer.context_embedder,
                                                            *transformer.transformer_blocks[: critic.i]]))
        if lora:
            raise ValueError(f"peft adapters are enabled in the shared head ({lora[0]}, ...): CFG's unconditional "
                             f"branch would not be the critic's (base-weight) head. Disable or merge-and-rebuild "
                             f"the adapters, or use CriticGuide")
        null = policy.null_embeds()
        if null.embeds.shape != head.null_embeds.shape:
            raise ValueError(f"critic null-text embeddings {tuple(head.null_embeds.shape)} and the policy's empty "
                             f"prompt {tuple(null.embeds.shape)} differ in shape: CFG batches need equal lengths")
        pairs = (("embeds", null.embeds, head.null_embeds), ("pooled", null.pooled, head.null_pooled))
        for name, ours, theirs in pairs:
            a, b = ours.float().norm().item(), theirs.float().norm().item()
            if not math.isclose(a, b, rel_tol=NULL_COND_RTOL):
                raise ValueError(f"the critic's null-text {name} (norm {b:.4g}) are not the policy's empty-prompt "
                                 f"{name} (norm {a:.4g}): the shared head would run another conditioning")
        mmdit.check_plain(transformer)
        if cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph must be one of {CUDA_GRAPH_MODES}; got {cuda_graph!r}")
        if cuda_graph is not None and policy.device.type != "cuda":
            raise ValueError(f"cuda_graph={cuda_graph!r} needs a CUDA device; the policy is on {policy.device}")
        self.policy, self.critic, self.guidance_scale = policy, critic, float(guidance_scale)
        self.transformer = transformer
        self.depth = critic.i
        self.num_blocks = mmdit.num_blocks(transformer)
        self.cuda_graph = cuda_graph
        self._graphed: dict[tuple[int, int], graphs.GraphedGrad] = {}  # "tail": stitch + tail per latent (h, w)
        if cuda_graph == "full":
            self._head_graph = graphs.GraphedGrad(self._head_embed)  # with the backward to z
            self._head_graph_nograd = graphs.GraphedNoGrad(self._head_embed)
            self._head_stream_graph = graphs.GraphedNoGrad(lambda z, sigma: tuple(self._head(z, sigma)))
            self._rest_graph = graphs.GraphedNoGrad(self._rest)
            self._side = torch.cuda.Stream(policy.device)  # the rest of the CFG forward overlaps the value backward

    def _null(self, batch: int) -> tuple[Tensor, Tensor]:
        head, dtype = self.critic.head, self.policy.dtype
        return head.null_embeds.to(dtype).expand(batch, -1, -1), head.null_pooled.to(dtype).expand(batch, -1)

    def _head(self, z: Tensor, sigma: Tensor, prompts: Sequence[str] | None = None) -> mmdit.Stream:
        """The StitchVM head u^{≤i}(z) as a CFG half after block i (grad follows the ambient mode): the unconditional
        stream, or for a prompt-conditioned head the conditional one, on the critic's own text rows."""
        if self.branch == "cond":
            embeds, pooled = self.critic.head_cond(list(prompts), z.shape[0])
            text = embeds.to(self.policy.dtype), pooled.to(self.policy.dtype)
        else:
            text = self._null(z.shape[0])
        return mmdit.run_blocks(self.transformer, mmdit.embed(self.transformer, z, sigma, *text), 0, self.depth)

    def _head_embed(self, z: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Head + stitch + tail: (image embedding, block-i stream detached) — the "full" graph's captured function."""
        head = self._head(z, sigma)
        embed = embed_from_block_tokens(self.critic, z.shape[-2], z.shape[-1], head.hidden)
        head = head.detach()
        return embed, head.hidden, head.context, head.temb

    def _rest(self, hidden: Tensor, context: Tensor, temb: Tensor, z: Tensor, sigma: Tensor, embeds: Tensor,
              pooled: Tensor) -> Tensor:
        """The CFG forward after the unconditional head: conditional blocks 1..i, both halves through i+1..N,
        final layer; returns (v_u, v_c) stacked as (2B, C, h, w)."""
        t, (H, W) = self.transformer, z.shape[-2:]
        cond_head = mmdit.run_blocks(t, mmdit.embed(t, z, sigma, embeds, pooled), 0, self.depth)
        both = mmdit.run_blocks(t, mmdit.Stream(hidden, context, temb).cat(cond_head), self.depth, self.num_blocks)
        return mmdit.finish(t, both, H, W)

    def _value(self, head: mmdit.Stream, z: Tensor, prompts: Sequence[str]) -> Tensor:
        """V from the head's block-i image tokens: stitch + tail + score, (B,) float32."""
        embed = partial(embed_from_block_tokens, self.critic, z.shape[-2], z.shape[-1])
        if self.cuda_graph == "tail" and head.hidden.requires_grad:  # one graph set per latent size, per input shape
            embed = self._graphed.setdefault(tuple(z.shape[-2:]), graphs.GraphedGrad(embed))
        # the text side (cached prompt embeddings) stays outside the graph
        return self.critic.score(embed(head.hidden), list(prompts)).float()

    def __call__(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str], need_value: bool = True,
                 need_grad: bool = True) -> GuideOutput:
        self.policy.check_latents(z)
        sigma = sigma_batch(sigma, z)
        value = grad = None
        if self.branch == "cond":
            return self._call_cond_branch(z, sigma, cond, prompts, need_value, need_grad)
        if self.cuda_graph == "full" and self.guidance_scale != 1.0:
            return self._call_graphed(z, sigma, cond, prompts, need_value, need_grad)
        # 1. Unconditional blocks 1..i = the StitchVM head. With a gradient: backpropagate V to z right away, so the
        #    head's activations are freed before the rest of the CFG forward runs (peak = max, not sum).
        if need_grad:
            leaf = grad_leaf(z)
            with torch.enable_grad():
                head = self._head(leaf, sigma)
                value = self._value(head, z, prompts)
                grad = grad_of(value, leaf)
            head, value = head.detach(), value.detach()
        elif need_value or self.guidance_scale != 1.0:
            with torch.no_grad():
                head = self._head(z, sigma)
                value = self._value(head, z, prompts) if need_value else None
        # 2. The rest of the CFG forward, no gradient: conditional blocks 1..i, then both halves through i+1..N.
        with torch.no_grad():
            t, (H, W) = self.transformer, z.shape[-2:]
            if self.guidance_scale == 1.0:
                v = mmdit.forward(t, z, sigma, cond.embeds, cond.pooled)
            else:
                cond_head = mmdit.run_blocks(t, mmdit.embed(t, z, sigma, cond.embeds, cond.pooled), 0, self.depth)
                both = mmdit.run_blocks(t, head.cat(cond_head), self.depth, self.num_blocks)
                v_u, v_c = mmdit.finish(t, both, H, W).chunk(2)
                v = cfg_combine(v_u, v_c, self.guidance_scale)
        return GuideOutput(v, value, grad)

    def _call_cond_branch(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str],
                          need_value: bool, need_grad: bool) -> GuideOutput:
        """A prompt-conditioned head is CFG's conditional half up to block i: it runs once (with autograd when a
        gradient is asked for), feeds V, and continues detached through blocks i+1..N next to the unconditional
        half, which runs without gradients. With w = 1 it is the whole forward."""
        embeds, pooled = self.critic.head_cond(list(prompts), z.shape[0])
        if not (torch.equal(embeds.to(cond.embeds), cond.embeds) and torch.equal(pooled.to(cond.pooled), cond.pooled)):
            raise ValueError("the sampler's prompt embeddings are not the critic head's encoding of `prompts`: pass "
                             "cond = policy.encode_prompts(prompts) (the head shares that CFG half), or use "
                             "CriticGuide")
        value = grad = None
        if need_grad:
            leaf = grad_leaf(z)
            with torch.enable_grad():
                head = self._head(leaf, sigma, prompts)
                value = self._value(head, z, prompts)
                grad = grad_of(value, leaf)
            head, value = head.detach(), value.detach()
        else:
            with torch.no_grad():
                head = self._head(z, sigma, prompts)
                value = self._value(head, z, prompts) if need_value else None
        with torch.no_grad():
            t, (H, W) = self.transformer, z.shape[-2:]
            if self.guidance_scale == 1.0:
                return GuideOutput(mmdit.finish(t, mmdit.run_blocks(t, head, self.depth, self.num_blocks), H, W),
                                   value, grad)
            uncond_head = mmdit.run_blocks(t, mmdit.embed(t, z, sigma, *self._null(z.shape[0])), 0, self.depth)
            both = mmdit.run_blocks(t, uncond_head.cat(head), self.depth, self.num_blocks)  # unconditional first
            v_u, v_c = mmdit.finish(t, both, H, W).chunk(2)
        return GuideOutput(cfg_combine(v_u, v_c, self.guidance_scale), value, grad)

    def _call_graphed(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str], need_value: bool,
                      need_grad: bool) -> GuideOutput:
        """The "full" CUDA-graph path: the same arithmetic as ``__call__``'s eager path, replayed.

        Once the head's block-i stream exists, the rest of the CFG forward and the value's scoring + backward are
        independent: the rest (large, batch-2B GEMMs) runs on a side stream while the backward through the head and
        the tail (batch-B, many small kernels) runs on the current one, so the GPU overlaps them."""
        value = grad = embed = None
        leaf = grad_leaf(z) if need_grad else None
        if need_grad:
            with torch.enable_grad():
                embed, hidden, context, temb = self._head_graph(leaf, sigma)
            # make_graphed_callables hands every output back through its autograd Function (requires_grad set):
            # the stream goes on without a graph, and the rest graph keeps one capture for both modes
            hidden, context, temb = hidden.detach(), context.detach(), temb.detach()
        elif need_value:
            with torch.no_grad():
                embed, hidden, context, temb = self._head_graph_nograd(z, sigma)
        else:  # the velocity only (e.g. DPS outside its guidance window): no stitch, no tail
            with torch.no_grad():
                hidden, context, temb = self._head_stream_graph(z, sigma)
        main = torch.cuda.current_stream(z.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side), torch.no_grad():
            v_both = self._rest_graph(hidden, context, temb, z, sigma, cond.embeds, cond.pooled)
        try:
            if need_grad:
                with torch.enable_grad():
                    value = self.critic.score(embed, list(prompts)).float()
                    grad = grad_of(value, leaf).clone()  # the graph's static buffer is overwritten by the next call
                value = value.detach()
            elif need_value:
                with torch.no_grad():
                    value = self.critic.score(embed, list(prompts)).float()
        finally:  # also on an error: the side stream still reads the head's static outputs
            main.wait_stream(self._side)
        v_both.record_stream(main)  # allocated on the side stream, used (and freed) on the current one
        v_u, v_c = v_both.chunk(2)
        return GuideOutput(cfg_combine(v_u, v_c, self.guidance_scale), value, grad)

    @torch.no_grad()
    def values(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds | None, prompts: Sequence[str]) -> Tensor:
        """V(z) through the same head code as the fused call (so FK compares like with like)."""
        self.policy.check_latents(z)
        sigma = sigma_batch(sigma, z)
        if self.cuda_graph == "full":
            return self.critic.score(self._head_graph_nograd(z, sigma)[0], list(prompts)).float()
        return self._value(self._head(z, sigma, prompts), z, prompts)


# ---------------------------------------------------------------------------------------------------------------
# Tweedie: the denoiser is CFG's conditional branch
# ---------------------------------------------------------------------------------------------------------------
class TweedieGuide:
    """Tweedie-DPS done as cheaply as it can be: the conditional half of the CFG forward is the denoiser.

    V(z) = r(D(z - sigma v_c(z))) (critics.baselines.TweedieCritic with guidance_scale = 1), differentiated through
    the conditional DiT forward, the VAE decoder and the reward. The unconditional half runs without gradients;
    the velocity is the CFG combination, detached. Saves the critic's second DiT forward that CriticGuide pays.

    Args:
        policy: the flow policy (the critic's own).  critic: a TweedieCritic with guidance_scale 1.
        guidance_scale: CFG weight w of the velocity.
    """

    def __init__(self, policy: FlowPolicy, critic: TweedieCritic, guidance_scale: float):
        if not isinstance(critic, TweedieCritic):
            raise TypeError(f"TweedieGuide needs a TweedieCritic, got {type(critic).__name__}; use CriticGuide")
        if critic.policy is not policy:
            raise ValueError("the TweedieCritic wraps another policy: its denoiser is not this CFG's branch")
        if critic.guidance_scale != 1.0:
            raise ValueError(f"TweedieGuide reuses the conditional branch (guidance 1.0) as the denoiser; the critic "
                             f"has guidance_scale={critic.guidance_scale}: use CriticGuide")
        mmdit.check_plain(policy.transformer)
        self.policy, self.critic, self.guidance_scale = policy, critic, float(guidance_scale)

    def _value(self, z: Tensor, v_c: Tensor, sigma: Tensor, prompts: Sequence[str]) -> Tensor:
        z_0 = z - sigma.view(-1, 1, 1, 1).to(v_c.dtype) * v_c  # Tweedie / posterior mean of rectified flow
        return self.critic.score_latents(z_0, list(prompts)).float()

    def __call__(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str], need_value: bool = True,
                 need_grad: bool = True) -> GuideOutput:
        self.policy.check_latents(z)
        sigma = sigma_batch(sigma, z)
        t, value, grad = self.policy.transformer, None, None
        if need_grad:
            leaf = grad_leaf(z)
            with torch.enable_grad():
                v_c = mmdit.forward(t, leaf, sigma, cond.embeds, cond.pooled)
                value = self._value(leaf, v_c, sigma, prompts)
                grad = grad_of(value, leaf)
            v_c, value = v_c.detach(), value.detach()
        else:
            with torch.no_grad():
                v_c = mmdit.forward(t, z, sigma, cond.embeds, cond.pooled)
                value = self._value(z, v_c, sigma, prompts) if need_value else None
        with torch.no_grad():
            if self.guidance_scale == 1.0:
                return GuideOutput(v_c, value, grad)
            null = self.policy.null_embeds().expand(z.shape[0])
            v_u = mmdit.forward(t, z, sigma, null.embeds, null.pooled)
            return GuideOutput(cfg_combine(v_u, v_c, self.guidance_scale), value, grad)

    @torch.no_grad()
    def values(self, z: Tensor, sigma: Tensor, cond: PromptEmbeds, prompts: Sequence[str]) -> Tensor:
        sigma = sigma_batch(sigma, z)
        return self._value(z, mmdit.forward(self.policy.transformer, z, sigma, cond.embeds, cond.pooled), sigma,
                           prompts)


def make_guide(policy: FlowPolicy, critic, guidance_scale: float, fused: bool = True,
               cuda_graph: str | None = None) -> Guide:
    """The cheapest exact guide for this critic: SharedHeadGuide for a StitchVM, TweedieGuide for a guidance-1
    TweedieCritic, else (or with ``fused=False``) CriticGuide. ``cuda_graph`` ("tail" / "full") is an option of
    SharedHeadGuide with a null-text head and an error for any other guide."""
    shared = fused and isinstance(critic, StitchVM)
    if cuda_graph is not None and not (shared and critic.head_conditioning == "null_text"):
        what = (f"a StitchVM with a {critic.head_conditioning}-conditioned head" if isinstance(critic, StitchVM)
                else type(critic).__name__)
        raise ValueError(f"cuda_graph={cuda_graph!r} applies to the StitchVM shared-head guide only (fused: true and "
                         f"a stitchvm critic with a null-text head); got {what} with fused={fused}: "
                         f"set cuda_graph: null")
    if shared:
        return SharedHeadGuide(policy, critic, guidance_scale, cuda_graph=cuda_graph)
    if fused and isinstance(critic, TweedieCritic) and critic.guidance_scale == 1.0 and critic.policy is policy:
        return TweedieGuide(policy, critic, guidance_scale)
    return CriticGuide(policy, critic, guidance_scale)
