"""StitchVM: a value model stitched from a diffusion head and a pixel reward tail.

Paper: "Stitched Value Model for Diffusion Alignment" (arXiv 2605.19804), Eq. 6 and App. C.1:

    V_ω^{(i,j)}(z_t) = r_φ^{≥j}( s_ψ( u_θ^{≤i}(z_t) ) )                                    (Eq. 6)
    s_ψ(h) = Up(F_ψ(h)) + G_ψ(Up(F_ψ(h)))                                                    (Eq. 57)

Notation          code
  u_θ^{≤i}        DiTHead: SD3 MMDiT patchify + timestep/text embedding + joint blocks 1..i (frozen, shared
                  with the policy transformer, not copied), on the null prompt "" or (head_conditioning "prompt")
                  on the prompt being valued
  s_ψ             Stitch: F_ψ = 1×1 conv initialised with the stage-1 fit (W*, b*), Up = fixed bilinear
                  resampling of the DiT token grid to the reward patch grid, G_ψ = Conv1×1 ∘ SiLU ∘ Conv1×1 ∘ SiLU
                  (bottleneck 1:8, last conv zero-initialised, so s_ψ = Up(F_ψ(h)) at initialisation)
  r_φ^{≥j}        VisionTail (critics/tails.py) from block j on, a trainable copy of the reward's vision tower
  V               StitchVM.value: reward score of the stitched image embedding (prompt-dependent rewards take the
                  inner product with the untouched text tower's prompt embedding)

Conventions: latents are normalised SD3 latents, sigma ∈ [0, 1] (1 = noise), DiT timestep = sigma · 1000. The head
is conditioned on the null prompt "" (the paper's fixed null-text conditioning) or, for a critic built with
head_conditioning "prompt" (ours), on the prompt being valued: V(z_t) = E[r(x0) | z_t, c] depends on where the
policy will take z_t, which the prompt c decides (a null-text Tweedie estimate ranks worse than the prompted one,
docs/critic.md), so the head sees what the policy sees. Such a critic was distilled with caption dropout, so its
head also runs on "" (the image-only embedding of the retrieval check).

Files written by `save_stitchvm` (only the trained parts; the head is the backbone's own first i blocks):
  stitch.safetensors, tail.safetensors (tail parameters used from block j on, + `class_token` for j > 1),
  stitchvm.json (interface, shapes, backbone/reward identity and fingerprints, versions).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import math
import os
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as nnf  # `F` is the paper's F_ψ below

from rl.checkpoint import verify_dir, write_dir_atomically
from critics.tails import TailOutput, VisionTail, make_tail, tail_kind

FORMAT_VERSION = 1
# Version 2 = a prompt-conditioned head. Null-text critics keep writing version 1 (the shipped files stay as they are);
# a reader that knows only version 1 thus refuses a prompt-conditioned critic instead of running it on null text.
FORMAT_VERSION_PROMPT_HEAD = 2
STITCH_FILE = "stitch.safetensors"
TAIL_FILE = "tail.safetensors"
META_FILE = "stitchvm.json"
CLASS_TOKEN_KEY = "class_token"
# Relative tolerance when checking that the null conditioning at load time is the one the critic was trained with
# (text encoders run in bf16 vs fp32 or on another device differ by ~1e-3).
NULL_COND_RTOL = 2e-2


HEAD_CONDITIONINGS = ("null_text", "prompt")


# ---------------------------------------------------------------------------------------------------------------
# Up: fixed bilinear resampling between token grids
# ---------------------------------------------------------------------------------------------------------------
def resample_grid(x: Tensor, out_grid: Sequence[int]) -> Tensor:
    """Up: bilinear resampling (B, D, h, w) → (B, D, *out_grid); identity when the grids match.

    align_corners=False; antialiased when shrinking so that every DiT token contributes (plain bilinear at a 4×
    reduction would read only a quarter of them). The map is linear with weights summing to one, hence
    Up(W h + b) = W Up(h) + b, which lets stage 1 fit W* on already-resampled features.
    """
    out_grid = tuple(out_grid)
    if tuple(x.shape[-2:]) == out_grid:
        return x
    shrinking = out_grid[0] < x.shape[-2] or out_grid[1] < x.shape[-1]
    return nnf.interpolate(x, size=out_grid, mode="bilinear", align_corners=False, antialias=shrinking)


def grid_to_tokens(x: Tensor) -> Tensor:
    """(B, D, h, w) → (B, h·w, D), row-major (the order of both ViT and MMDiT patch tokens)."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# u_θ^{≤i}: the DiT head
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def peft_adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run `module` on its base weights: a policy being LoRA-tuned must not move the critic's head.

    Restores each adapter layer's enabled state and the requires_grad flags that peft's toggle rewrites.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        yield
        return
    was_disabled = [m.disable_adapters for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


def _is_adapter_param(name: str) -> bool:
    return "lora_" in name


class DiTHead(nn.Module):
    """u_θ^{≤i}: the first i joint blocks of an SD3Transformer2DModel, frozen, null-text conditioned.

    The sub-modules are the transformer's own (shared, not copied); their base weights are set to
    requires_grad=False and peft adapters, if any, are bypassed during the forward. Pass a deep copy of the
    transformer if its base weights are to be trained elsewhere.

    Args:
        transformer: diffusers SD3Transformer2DModel.
        i: number of joint blocks kept, 1 ≤ i ≤ num_layers.
        null_embeds: (1, L, joint_attention_dim) prompt embeddings of "" from the policy's text encoder.
        null_pooled: (1, pooled_projection_dim) pooled embedding of "".
        latent_size: latent side the critic works at (default: transformer.config.sample_size).
    """

    def __init__(self, transformer: nn.Module, i: int, null_embeds: Tensor, null_pooled: Tensor,
                 latent_size: int | None = None):
        super().__init__()
        cfg = transformer.config
        self.num_layers = len(transformer.transformer_blocks)
        if not 1 <= i <= self.num_layers:
            raise ValueError(f"DiT head depth i must be in [1, {self.num_layers}] for this transformer; got {i}")
        if null_embeds.dim() != 3 or null_embeds.shape[0] != 1 or null_embeds.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"null_embeds must be (1, L, {cfg.joint_attention_dim}); got {tuple(null_embeds.shape)}")
        if tuple(null_pooled.shape) != (1, cfg.pooled_projection_dim):
            raise ValueError(f"null_pooled must be (1, {cfg.pooled_projection_dim}); got {tuple(null_pooled.shape)}")
        self.i = i
        self.patch_size = cfg.patch_size
        self.latent_channels = cfg.in_channels
        self.sample_size = cfg.sample_size
        self.latent_size = latent_size if latent_size is not None else cfg.sample_size
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} is not a multiple of the patch size {self.patch_size}")
        self.width = cfg.num_attention_heads * cfg.attention_head_dim
        self.grid = (self.latent_size // self.patch_size,) * 2
        self.backbone_config = {k: cfg[k] for k in (
            "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")}

        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:i])  # same names as in the DiT
        self.register_buffer("null_embeds", null_embeds.detach().clone())
        self.register_buffer("null_pooled", null_pooled.detach().clone())
        for name, p in self.named_parameters():
            if not _is_adapter_param(name):
                p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "DiTHead":
        """The head is frozen: it stays in eval mode whatever the enclosing module does."""
        return self

    @property
    def device(self) -> torch.device:
        """Where the head runs (and where stage 1 / stage 2 put their batches)."""
        return self.null_embeds.device

    def fingerprint(self) -> str:
        """sha256 over the head's base parameters (names as in the transformer, values rounded to bf16).

        Rounding to bf16 makes an fp32 and a bf16 copy of the same checkpoint agree; peft adapter tensors are
        skipped and their `.base_layer` renaming undone, so a LoRA-wrapped policy keeps its fingerprint.
        """
        h = hashlib.sha256()
        for name, p in self.named_parameters():
            if _is_adapter_param(name) or name.startswith("null_"):
                continue
            t = p.detach().to("cpu", torch.bfloat16).contiguous()
            h.update(name.replace(".base_layer", "").encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.int16).numpy().tobytes())
        return h.hexdigest()

    def _check_latents(self, z_t: Tensor) -> None:
        if z_t.dim() != 4 or z_t.shape[1] != self.latent_channels:
            raise ValueError(f"z_t must be (B, {self.latent_channels}, h, w); got {tuple(z_t.shape)}")

    def forward_taps(self, z_t: Tensor, sigma: Tensor | float, taps: Sequence[int],
                     cond: tuple[Tensor, Tensor] | None = None) -> dict[int, Tensor]:
        """One forward pass returning the image-stream output of every requested block.

        Args:
            z_t: (B, C, h, w) normalised noisy latents.
            sigma: (B,) or scalar noise level in [0, 1].
            taps: 1-based block indices ≤ i.
            cond: (embeds (B, L, joint_attention_dim), pooled (B, pooled_projection_dim)) of the policy's text
                encoder, one row per latent; None: the null prompt (the buffers).
        Returns:
            {i': (B, D_dit, h/p, w/p)} token grids after block i'.
        """
        self._check_latents(z_t)
        if not taps or min(taps) < 1 or max(taps) > self.i:
            raise ValueError(f"taps must lie in [1, {self.i}] (head depth); got {list(taps)}")
        B, _, h, w = z_t.shape
        z_t = z_t.to(self.pos_embed.proj.weight.dtype)  # e.g. float32 latents into a bf16 backbone
        # the SD3 timestep convention, computed in float32 as FlowPolicy does (bf16 would turn 0.7 into 0.699)
        sigma = torch.as_tensor(sigma, device=z_t.device, dtype=torch.float32).expand(B)
        timestep = sigma * 1000.0
        out: dict[int, Tensor] = {}
        if cond is not None:
            embeds, pooled = cond
            if embeds.shape[1:] != self.null_embeds.shape[1:] or tuple(pooled.shape[1:]) != self.null_pooled.shape[1:] \
                    or embeds.shape[0] != B or pooled.shape[0] != B:
                raise ValueError(f"cond must be ({B}, {', '.join(map(str, self.null_embeds.shape[1:]))}) embeds and "
                                 f"({B}, {self.null_pooled.shape[1]}) pooled from the policy's text encoder; got "
                                 f"{tuple(embeds.shape)} and {tuple(pooled.shape)}")
        with peft_adapters_disabled(self):
            hidden = self.pos_embed(z_t).contiguous()  # (B, N, D_dit), pos-embed added
            if cond is None:  # the null prompt: embedded once, broadcast to the batch
                temb = self.time_text_embed(timestep, self.null_pooled.to(z_t.dtype).expand(B, -1))  # (B, D_dit)
                context = self.context_embedder(self.null_embeds.to(z_t.dtype)).expand(B, -1, -1)  # (B, L, D_dit)
            else:
                temb = self.time_text_embed(timestep, pooled.to(z_t.dtype))
                context = self.context_embedder(embeds.to(z_t.dtype))
            for k, block in enumerate(self.transformer_blocks[: max(taps)]):
                # joint blocks return (encoder_hidden_states, hidden_states); the last block of the full model
                # (context_pre_only) returns None for the text stream, which is never used after it
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
                if k + 1 in taps:
                    out[k + 1] = self.features_from_block_outputs(hidden, h, w)
        return out

    def forward(self, z_t: Tensor, sigma: Tensor | float, cond: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """u_θ^{≤i}(z_t): (B, C, h, w) → (B, D_dit, h/p, w/p); cond as in forward_taps."""
        return self.forward_taps(z_t, sigma, [self.i], cond)[self.i]

    def features_from_block_outputs(self, hidden_states: Tensor, height: int, width: int) -> Tensor:
        """Image-stream tokens (B, N, D_dit) of a latent of size (height, width) → grid (B, D_dit, h/p, w/p).

        Lets a caller that already ran the null-text (unconditional CFG) branch of the same, un-adapted
        transformer reuse its block-i hidden states instead of re-running the head.
        """
        gh, gw = height // self.patch_size, width // self.patch_size
        B, N, D = hidden_states.shape
        if N != gh * gw:
            raise ValueError(f"{N} tokens do not form the {gh}×{gw} grid of a {height}×{width} latent")
        return hidden_states.transpose(1, 2).reshape(B, D, gh, gw)


# ---------------------------------------------------------------------------------------------------------------
# s_ψ: the stitching layer (Eq. 57)
# ---------------------------------------------------------------------------------------------------------------
class Stitch(nn.Module):
    """s_ψ(h) = Up(F_ψ(h)) + G_ψ(Up(F_ψ(h))), flattened to patch tokens.

    Args:
        in_dim: DiT width D_dit.  out_dim: tail width D.
        in_grid: DiT token grid (h/p, w/p).  out_grid: reward patch grid.
        W: (out_dim, in_dim) stage-1 fit W* (None: default conv init, e.g. before loading weights).
        b: (out_dim,) stage-1 intercept b*.
        bottleneck_ratio: G_ψ's hidden width is out_dim // bottleneck_ratio (paper 1:8).
        blocks: ours, 0 = the paper's stitch. That many pre-norm transformer blocks of the tail's width on the
            stitched tokens, after Eq. 57, each with its output projections zero-initialised, so s_ψ is still
            Up(F_ψ(h)) at initialisation. Capacity between the frozen head and the tail: after stage 2 the student
            ranks the policy's own samples at ρ ~.93 against the teacher on the very images (docs/critic.md,
            session 14), and the per-token G_ψ cannot mix tokens as the VAE decoder does.
    """

    def __init__(self, in_dim: int, out_dim: int, in_grid: Sequence[int], out_grid: Sequence[int],
                 W: Tensor | None = None, b: Tensor | None = None, bottleneck_ratio: int = 8, blocks: int = 0):
        super().__init__()
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.in_grid, self.out_grid = tuple(in_grid), tuple(out_grid)
        self.bottleneck_ratio = bottleneck_ratio
        hidden = max(1, out_dim // bottleneck_ratio)
        self.F = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        # G_ψ = Conv1×1 ∘ SiLU ∘ Conv1×1 ∘ SiLU (composition: the SiLU on the right acts first)
        self.G = nn.Sequential(nn.SiLU(), nn.Conv2d(out_dim, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, out_dim, 1))
        nn.init.zeros_(self.G[-1].weight)
        nn.init.zeros_(self.G[-1].bias)  # G ≡ 0 at initialisation: s_ψ starts as the closed-form map
        if W is not None:
            if tuple(W.shape) != (out_dim, in_dim):
                raise ValueError(f"W must be ({out_dim}, {in_dim}); got {tuple(W.shape)}")
            with torch.no_grad():
                self.F.weight.copy_(W.view(out_dim, in_dim, 1, 1))
                self.F.bias.copy_(b if b is not None else torch.zeros(out_dim))
        self.blocks = nn.ModuleList(identity_block(out_dim) for _ in range(blocks))

    def forward(self, h: Tensor) -> Tensor:
        """(B, D_dit, *in_grid) → tokens (B, N, D) on the reward patch grid."""
        if tuple(h.shape[-2:]) != self.in_grid or h.shape[1] != self.in_dim:
            raise ValueError(f"stitch built for (B, {self.in_dim}, {self.in_grid[0]}, {self.in_grid[1]}) "
                             f"features; got {tuple(h.shape)} (latent size differs from the critic's?)")
        up = resample_grid(self.F(h), self.out_grid)  # (B, D, gh, gw)
        tokens = grid_to_tokens(up + self.G(up))
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def config(self) -> dict[str, int]:
        """What a loader needs besides the widths and grids (stored in stitchvm.json)."""
        return {"bottleneck_ratio": self.bottleneck_ratio, "stitch_blocks": len(self.blocks)}


def identity_block(width: int) -> nn.TransformerEncoderLayer:
    """A pre-norm transformer block (ViT layout: GELU MLP of 4x width, 64-wide heads) that starts as the identity:
    its attention output projection and its MLP's second layer are zero, so both residual branches add 0."""
    heads = width // 64 if width % 64 == 0 else 1  # every ViT width is a multiple of 64
    block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    for layer in (block.self_attn.out_proj, block.linear2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return block


def stitch_kwargs(meta: dict) -> dict[str, int]:
    """Stitch's keyword arguments from a saved critic's JSON (critics saved before ``stitch_blocks`` have none)."""
    return {"bottleneck_ratio": meta["bottleneck_ratio"], "blocks": meta.get("stitch_blocks", 0)}


# ---------------------------------------------------------------------------------------------------------------
# Scores: how an image embedding becomes a value
# ---------------------------------------------------------------------------------------------------------------
class PromptRows:
    """Per-prompt rows of a text encoder, cached by prompt string (LRU of ``cache_size`` prompts).

    ``encode_rows(prompts)`` gives one row per prompt: a tensor or a tuple of tensors. Each is stored as a copy of
    its own (a view would keep the whole encoded batch alive), without gradients.
    """

    def __init__(self, encode_rows: Callable[[list[str]], Iterable], cache_size: int = 4096):
        self.encode_rows, self.cache_size = encode_rows, cache_size
        self._cache: OrderedDict[str, Tensor | tuple[Tensor, ...]] = OrderedDict()

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> list:
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got a single str: {prompts!r:.80}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for p, row in zip(missing, self.encode_rows(missing)):
                self._cache[p] = (tuple(t.detach().clone() for t in row) if isinstance(row, tuple)
                                  else row.detach().clone())
        for p in prompts:
            self._cache.move_to_end(p)
        rows = [self._cache[p] for p in prompts]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return rows


class PromptScore:
    """Prompt-dependent reward (CLIP score, HPSv2): V = reward.score_from_embeds(e_img, reward.text_embed(p)).

    The text tower is never run with gradients; its embeddings are cached per prompt string (PromptRows).
    Not an nn.Module on purpose: the reward stays outside StitchVM's parameters and state_dict.
    """

    kind = "prompt"

    def __init__(self, reward: nn.Module, cache_size: int = 4096):
        self.reward = reward
        self._text = PromptRows(reward.text_embed, cache_size)

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        return torch.stack(self._text(prompts))

    def __call__(self, image_embed: Tensor, prompts: Sequence[str] | None) -> Tensor:
        if prompts is None or len(prompts) != image_embed.shape[0]:
            raise ValueError(f"a prompt-dependent critic needs one prompt per sample ({image_embed.shape[0]}); "
                             f"got {None if prompts is None else len(prompts)}")
        txt = self.text_embeds(prompts).to(image_embed.device)
        return self.reward.score_from_embeds(image_embed, txt)


class ImageScore:
    """Prompt-independent reward (aesthetic): V = reward.score_from_image_embed(e_img); prompts are ignored."""

    kind = "image"

    def __init__(self, reward: nn.Module):
        self.reward = reward

    def __call__(self, image_embed: Tensor, prompts: Sequence[str] | None) -> Tensor:
        return self.reward.score_from_image_embed(image_embed)


class HeadText(PromptRows):
    """The policy's text encoder for a prompt-conditioned head: prompts → (embeds (B, L, D), pooled (B, P)),
    cached per prompt string (PromptRows; trainers value the same prompts at every step of a group's trajectories).

    Not an nn.Module, and a deep copy of the critic shares it (``__deepcopy__`` returns self): the encoder is the
    policy's, as PromptScore's reward stays outside the critic's parameters. Several critics of one policy (the
    noise-level experts) may share one instance. ``cache_size`` counts prompts: at SD3.5 size a prompt's rows are
    333 x 4096 bf16 (2.7 MB), so lower it there when many distinct prompts are valued.
    """

    def __init__(self, encode: Callable[[list[str]], object], cache_size: int = 4096):
        self.encode = encode  # -> PromptEmbeds
        super().__init__(self._rows_of, cache_size)

    def _rows_of(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        out = self.encode(prompts)
        return list(zip(out.embeds, out.pooled))

    def __deepcopy__(self, memo: dict) -> "HeadText":
        return self

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        rows = super().__call__(prompts)
        return torch.stack([e for e, _ in rows]), torch.stack([q for _, q in rows])


def as_head_text(encode: Callable[[list[str]], object] | HeadText | None) -> HeadText | None:
    """A HeadText as given (shared, its cache too), a bare text encoder wrapped in its own, None as None."""
    return encode if encode is None or isinstance(encode, HeadText) else HeadText(encode)


def make_score(reward: nn.Module, kind: str) -> PromptScore | ImageScore:
    """kind: "prompt" (score_from_embeds with the text tower) or "image" (score_from_image_embed)."""
    if kind == "prompt":
        return PromptScore(reward)
    if kind == "image":
        return ImageScore(reward)
    raise ValueError(f"score kind must be 'prompt' or 'image'; got {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# V_ω^{(i,j)}
# ---------------------------------------------------------------------------------------------------------------
class StitchVM(nn.Module):
    """V(z_t) = r^{≥j}(s(u^{≤i}(z_t))) (Eq. 6). Implements the Critic protocol (critics/base.py).

    Args:
        head: DiTHead (u^{≤i}).  stitch: Stitch (s_ψ).  tail: VisionTail (a trainable copy of the reward tower).
        j: 1-based first tail block.  score: PromptScore | ImageScore.
        class_token: (D,) class token entering block j, required for j > 1 (learned), None for j = 1.
        meta: identity of the backbone / reward (free-form, stored in stitchvm.json).
        head_text: the policy's text encoder (HeadText) for a prompt-conditioned head; None: the null-text head.
    """

    dense = True  # a value exists at every sigma (critics/base.py)

    def __init__(self, head: DiTHead, stitch: Stitch, tail: VisionTail, j: int,
                 score: PromptScore | ImageScore, class_token: Tensor | None = None, meta: dict | None = None,
                 head_text: HeadText | None = None):
        super().__init__()
        tail.check_block(j)
        if (stitch.in_dim, stitch.in_grid) != (head.width, head.grid):
            raise ValueError(f"stitch expects ({stitch.in_dim}, {stitch.in_grid}) DiT features; head gives "
                             f"({head.width}, {head.grid})")
        if (stitch.out_dim, stitch.out_grid) != (tail.width, tail.grid):
            raise ValueError(f"stitch produces ({stitch.out_dim}, {stitch.out_grid}) tokens; tail needs "
                             f"({tail.width}, {tail.grid})")
        if (j == 1) != (class_token is None):
            raise ValueError("class_token is required for j > 1 and must be None for j = 1")
        self.head, self.stitch, self.tail, self.j, self.score = head, stitch, tail, j, score
        self.class_token = nn.Parameter(class_token.detach().clone()) if class_token is not None else None
        self.meta = dict(meta or {})
        self.head_text = head_text

    @property
    def i(self) -> int:
        return self.head.i

    @property
    def latent_channels(self) -> int:
        return self.head.latent_channels

    @property
    def latent_size(self) -> int:
        return self.head.latent_size

    @property
    def head_conditioning(self) -> str:
        """"prompt": the head runs on the prompt being valued; "null_text": on "" (the paper's setting)."""
        return "null_text" if self.head_text is None else "prompt"

    def head_cond(self, prompts: Sequence[str] | None, batch: int) -> tuple[Tensor, Tensor] | None:
        """The head's conditioning for a batch: None (null text) for a null-text head or prompts=None, else the
        prompts' text-encoder rows (one prompt per latent)."""
        if self.head_text is None or prompts is None:
            return None
        if len(prompts) != batch:
            raise ValueError(f"a prompt-conditioned StitchVM head needs one prompt per latent ({batch}); got "
                             f"{len(prompts)}")
        embeds, pooled = self.head_text(prompts)
        device = self.head.device
        return embeds.to(device), pooled.to(device)

    def features(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> TailOutput:
        """(B, C, h, w) → TailOutput(embed (B, E), tokens (B, N+1, D)). A prompt-conditioned head runs on
        ``prompts``; with prompts=None it runs on "" (the image-only embedding it was also distilled for)."""
        return self.features_from_cond(z_t, sigma, self.head_cond(prompts, z_t.shape[0]))

    def features_from_cond(self, z_t: Tensor, sigma: Tensor | float, cond: tuple[Tensor, Tensor] | None) -> TailOutput:
        """:meth:`features` given the head's conditioning rows (:meth:`head_cond`; None: null text): a function of
        tensors alone, which torch.compile traces without a break (critics.distill ``compile``)."""
        return self.features_from_head(self.head(z_t, sigma) if cond is None else self.head(z_t, sigma, cond))

    def features_from_head(self, h: Tensor) -> TailOutput:
        """Stitch + tail on precomputed head features (B, D_dit, h/p, w/p) (see DiTHead.features_from_block_outputs)."""
        tokens = self.stitch(h.to(self.stitch.F.weight.dtype))  # (B, N, D); the head may run in another dtype
        return self.tail.forward_from(tokens.to(self.tail.stem_conv.weight.dtype), self.j, self.class_token)

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        """V(z_t): (B,) float32, differentiable in z_t."""
        if self.head_text is not None and prompts is None:
            raise ValueError("this StitchVM's head is prompt-conditioned (head_conditioning 'prompt'): pass the "
                             "prompts being valued, one per latent")
        return self.score(self.features(z_t, sigma, prompts).embed, prompts).float()

    def forward(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        return self.value(z_t, sigma, prompts)

    def stitch_parameters(self) -> list[nn.Parameter]:
        return list(self.stitch.parameters())

    def tail_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trained tail part: parameters used from block j on, plus the class token state for j > 1."""
        named = self.tail.suffix_named_parameters(self.j)
        if self.class_token is not None:
            named.append((CLASS_TOKEN_KEY, self.class_token))
        return named


def build_stitchvm(transformer: nn.Module, reward: nn.Module, i: int, j: int, W: Tensor, b: Tensor,
                   null_embeds: Tensor, null_pooled: Tensor, score_kind: str, *, latent_size: int | None = None,
                   probe_pixels: Tensor | None = None, preprocess: Callable[[Tensor], Tensor] | None = None,
                   bottleneck_ratio: int = 8, stitch_blocks: int = 0, meta: dict | None = None,
                   encode_prompts: Callable[[list[str]], object] | HeadText | None = None) -> StitchVM:
    """Assemble a StitchVM at initialisation from a stage-1 fit.

    The head shares the transformer's modules; the tail is a deep copy of `reward.vision` (trained in stage 2
    while the original stays the frozen teacher).

    Args:
        W, b: stage-1 fit for (i, j), (D_tail, D_dit) and (D_tail,).
        probe_pixels: normalised probe images (B, 3, H, W); required for j > 1 to initialise the class token.
        score_kind: "prompt" | "image" (see make_score).
        encode_prompts: the policy's text encoder (FlowPolicy.encode_prompts), or a HeadText over it (shared as
            given), for a prompt-conditioned head; None: the null-text head.
    """
    head = DiTHead(transformer, i, null_embeds, null_pooled, latent_size)
    teacher_tail = make_tail(reward.vision, preprocess)
    tail = make_tail(copy.deepcopy(reward.vision), preprocess)
    class_token = None
    if j > 1:
        if probe_pixels is None:
            raise ValueError(f"j = {j} > 1: pass probe_pixels to initialise the class token entering block j")
        class_token = tail.mean_class_token(probe_pixels, j)
    stitch = Stitch(head.width, tail.width, head.grid, tail.grid, W, b, bottleneck_ratio, stitch_blocks)
    stitch.to(device=head.null_embeds.device)
    meta = dict(meta or {})
    meta["reward_fingerprint"] = vision_fingerprint(teacher_tail)
    return StitchVM(head, stitch, tail, j, make_score(reward, score_kind), class_token, meta,
                    as_head_text(encode_prompts))


def vision_fingerprint(tail: VisionTail) -> str:
    """sha256 over a reward tower's parameters (bf16-rounded): identifies the teacher a critic was distilled from."""
    h = hashlib.sha256()
    for name, p in tail.vision.named_parameters():
        t = p.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(name.encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {}
    for dist in ("stitchvm", "torch", "diffusers", "transformers", "open_clip_torch", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _null_norms(head: DiTHead) -> dict[str, float]:
    return {"null_embeds_norm": float(head.null_embeds.float().norm()),
            "null_pooled_norm": float(head.null_pooled.float().norm())}


def save_stitchvm(path_dir: str | os.PathLike, model: StitchVM, meta: dict | None = None) -> None:
    """Write stitch.safetensors, tail.safetensors and stitchvm.json to `path_dir`, atomically.

    Args:
        meta: identity fields to record, e.g. {"backbone": "stabilityai/stable-diffusion-3.5-medium",
              "reward": "clip_vit_l14", "image_size": 512}; merged over `model.meta`.
    """
    path_dir = os.fspath(path_dir)
    head, tail = model.head, model.tail
    info = {**model.meta, **(meta or {})}
    if "reward_fingerprint" not in info:
        raise ValueError("model.meta lacks 'reward_fingerprint' (the teacher's identity, checked at load): build the "
                         "critic with build_stitchvm, or set it to vision_fingerprint(make_tail(reward.vision))")
    info.update({
        "format_version": FORMAT_VERSION if model.head_text is None else FORMAT_VERSION_PROMPT_HEAD,
        "i": model.i, "j": model.j,
        "score_kind": model.score.kind,
        "head_conditioning": model.head_conditioning,
        "latent_channels": head.latent_channels, "latent_size": head.latent_size,
        "dit_width": head.width, "dit_grid": list(head.grid), "dit_num_layers": head.num_layers,
        "backbone_config": head.backbone_config,
        "head_fingerprint": head.fingerprint(),
        **_null_norms(head),
        "tail_kind": tail_kind(tail), "tail_width": tail.width, "tail_grid": list(tail.grid),
        "tail_num_blocks": tail.num_blocks, "tail_image_size": list(tail.image_size), "embed_dim": tail.embed_dim,
        **model.stitch.config(),
        "versions": _versions(),
    })
    stitch_sd = {k: v.detach().cpu().contiguous() for k, v in model.stitch.state_dict().items()}
    tail_sd = {k: v.detach().cpu().clone().contiguous() for k, v in model.tail_named_parameters()}
    def write(tmp: str) -> None:
        save_file(stitch_sd, os.path.join(tmp, STITCH_FILE))
        save_file(tail_sd, os.path.join(tmp, TAIL_FILE))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)

    write_dir_atomically(path_dir, write, manifest=True)


def read_critic_file(path: str) -> dict:
    """A saved critic's JSON or safetensors file; a damaged one (half-copied, truncated) is a ValueError naming it."""
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return load_file(path)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); rebuild the critic (python -m critics.build) "
                         f"or copy it again") from e


# the metadata file that names each kind of saved critic (critics/vae_stitch.py writes the second)
CRITIC_META_FILES = {"stitchvm": META_FILE, "vae_stitch": "vae_stitch.json"}


def check_critic_kind(path_dir: str, kind: str) -> None:
    """A FileNotFoundError that says so when ``path_dir`` holds a saved critic of another kind than ``kind``."""
    for other, meta in CRITIC_META_FILES.items():
        if other != kind and os.path.isfile(os.path.join(path_dir, meta)) and \
                not os.path.isfile(os.path.join(path_dir, CRITIC_META_FILES[kind])):
            raise FileNotFoundError(f"{path_dir} holds a {other} critic ({meta}), not a {kind} one: load it as a "
                                    f"{other} critic, or give the directory of a {kind} critic")


def read_stitchvm_meta(path_dir: str | os.PathLike) -> dict:
    """The stitchvm.json of a saved critic; FileNotFoundError naming the path when a file is missing."""
    path_dir = os.fspath(path_dir)
    check_critic_kind(path_dir, "stitchvm")
    for name in (META_FILE, STITCH_FILE, TAIL_FILE):
        p = os.path.join(path_dir, name)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"StitchVM checkpoint incomplete: {p} does not exist")
    return read_critic_file(os.path.join(path_dir, META_FILE))


def _check_pairing(meta: dict, head: DiTHead, path_dir: str) -> None:
    built_for = (f"backbone {meta.get('backbone', '<unnamed>')} (latent {meta['latent_channels']}×"
                 f"{meta['latent_size']}², head fingerprint {meta['head_fingerprint'][:12]})")
    if head.backbone_config != meta["backbone_config"]:
        diff = {k: (meta["backbone_config"].get(k), v) for k, v in head.backbone_config.items()
                if meta["backbone_config"].get(k) != v}
        raise ValueError(f"critic at {path_dir} was built for another backbone / latent space: {built_for}; "
                         f"config differs as (saved, given): {diff}")
    fp = head.fingerprint()
    if fp != meta["head_fingerprint"]:
        raise ValueError(f"critic at {path_dir} was built for {built_for}; the given transformer's first "
                         f"{head.i} blocks have fingerprint {fp[:12]} (other weights, or merged LoRA)")
    for key, value in _null_norms(head).items():
        if not math.isclose(value, meta[key], rel_tol=NULL_COND_RTOL):
            raise ValueError(f"critic at {path_dir}: null-text conditioning differs from training "
                             f"({key} {value:.4g} vs {meta[key]:.4g}); pass the embeddings of '' from the "
                             f"policy's own text encoder")


def load_stitchvm(path_dir: str | os.PathLike, transformer: nn.Module, reward: nn.Module, null_embeds: Tensor,
                  null_pooled: Tensor, preprocess: Callable[[Tensor], Tensor] | None = None,
                  encode_prompts: Callable[[list[str]], object] | HeadText | None = None) -> StitchVM:
    """Rebuild a saved StitchVM around `transformer` (head, shared) and a copy of `reward.vision` (tail).

    A critic saved with head_conditioning "prompt" needs ``encode_prompts``, the policy's text encoder
    (FlowPolicy.encode_prompts); critics saved before that field existed have a null-text head.

    Raises:
        FileNotFoundError: a checkpoint file is missing (the message names it).
        ValueError: the transformer, null conditioning or reward tower is not the one the critic was built for.
    """
    path_dir = os.fspath(path_dir)
    verify_dir(path_dir)  # sizes + sha256 against manifest.json: a damaged file is named, never half-loaded
    meta = read_stitchvm_meta(path_dir)
    if meta["format_version"] not in (FORMAT_VERSION, FORMAT_VERSION_PROMPT_HEAD):
        raise ValueError(f"{path_dir}: format_version {meta['format_version']}, this code reads "
                         f"{FORMAT_VERSION} and {FORMAT_VERSION_PROMPT_HEAD}")
    if transformer.config.in_channels != meta["latent_channels"]:
        raise ValueError(f"critic at {path_dir} was built for another latent space: {meta['latent_channels']} "
                         f"latent channels (backbone {meta.get('backbone', '<unnamed>')}); the given transformer "
                         f"has {transformer.config.in_channels}")
    head = DiTHead(transformer, meta["i"], null_embeds, null_pooled, meta["latent_size"])
    _check_pairing(meta, head, path_dir)
    conditioning = meta.get("head_conditioning", "null_text")
    if conditioning not in HEAD_CONDITIONINGS:
        raise ValueError(f"{path_dir}: head_conditioning {conditioning!r}; this code reads {HEAD_CONDITIONINGS}")
    if (conditioning == "prompt") != (meta["format_version"] == FORMAT_VERSION_PROMPT_HEAD):
        raise ValueError(f"{path_dir}/{META_FILE} is inconsistent: head_conditioning {conditioning!r} with "
                         f"format_version {meta['format_version']} (a prompt-conditioned head is version "
                         f"{FORMAT_VERSION_PROMPT_HEAD}); rebuild the critic")
    if conditioning == "prompt" and encode_prompts is None:
        raise ValueError(f"critic at {path_dir} has a prompt-conditioned head: pass encode_prompts (the policy's "
                         f"text encoder, policy.encode_prompts); critics.load.stitchvm does")

    teacher = make_tail(reward.vision, preprocess)
    got = (tail_kind(teacher), teacher.width, list(teacher.grid), teacher.num_blocks, teacher.embed_dim)
    want = (meta["tail_kind"], meta["tail_width"], meta["tail_grid"], meta["tail_num_blocks"], meta["embed_dim"])
    if got != want:
        raise ValueError(f"critic at {path_dir} was built for reward {meta.get('reward', '<unnamed>')} with tower "
                         f"(kind, width, grid, blocks, embed) = {want}; the given reward has {got}")
    if vision_fingerprint(teacher) != meta["reward_fingerprint"]:
        raise ValueError(f"critic at {path_dir} was distilled from another reward model "
                         f"({meta.get('reward', '<unnamed>')}): the given reward tower's weights differ")

    tail = make_tail(copy.deepcopy(reward.vision), preprocess)
    j = meta["j"]
    tail_sd = read_critic_file(os.path.join(path_dir, TAIL_FILE))
    class_token = tail_sd.pop(CLASS_TOKEN_KEY, None)
    expected = dict(tail.suffix_named_parameters(j))
    missing, unexpected = sorted(set(expected) - set(tail_sd)), sorted(set(tail_sd) - set(expected))
    if missing or unexpected or (j > 1) != (class_token is not None):
        raise ValueError(f"{os.path.join(path_dir, TAIL_FILE)} does not match a tail from block {j}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, class token "
                         f"{'present' if class_token is not None else 'absent'}")
    with torch.no_grad():
        for name, p in expected.items():
            if p.shape != tail_sd[name].shape:
                raise ValueError(f"{TAIL_FILE}: {name} has shape {tuple(tail_sd[name].shape)}, "
                                 f"tower has {tuple(p.shape)}")
            p.copy_(tail_sd[name])

    stitch = Stitch(meta["dit_width"], meta["tail_width"], meta["dit_grid"], meta["tail_grid"], **stitch_kwargs(meta))
    stitch.load_state_dict(read_critic_file(os.path.join(path_dir, STITCH_FILE)), strict=True)
    device = head.null_embeds.device
    stitch.to(device)
    if class_token is not None:
        class_token = class_token.to(device)
    keep = {k: v for k, v in meta.items() if k in ("backbone", "reward", "image_size", "reward_fingerprint")}
    return StitchVM(head, stitch, tail, j, make_score(reward, meta["score_kind"]), class_token, keep,
                    as_head_text(encode_prompts) if conditioning == "prompt" else None)
