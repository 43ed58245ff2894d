"""Reward-model vision towers cut at block j: the tail r_φ^{≥j} of StitchVM (paper Eq. 6).

A ViT reward tower is  stem → [CLS]-prepend + pos-embed + ln_pre → blocks 1..L → ln_post → pool → proj.
StitchVM keeps blocks j..L and replaces everything before them by the stitched DiT head. A `VisionTail` wraps
the library's own module (open_clip `VisionTransformer` or transformers `CLIPVisionModel[WithProjection]`)
and calls its sub-modules in the library's own order, so that cutting and re-joining reproduces the library's
image embedding exactly (tested to float32 precision).

What "the input of block j" means here (1-based j, as in the paper):
  j = 1   r^{≤0}(x): the stem output, i.e. the patch embedding (conv1 / patch_embedding) flattened to patch
          tokens, BEFORE the class token, the positional embedding and ln_pre. The tail from j = 1 re-applies
          [CLS]-prepend + pos-embed + ln_pre and runs all L blocks (paper App. C.1: "prepend the reward model's
          special tokens and add its positional embeddings"). The stitch therefore replaces only the stem.
  j > 1   r^{≤j−1}(x): the patch tokens of the residual stream leaving block j−1 (the pos-embed is already
          mixed in; it is not re-added). The tail runs blocks j..L.

The class token for j > 1 depends on the image (through attention in blocks < j), so it cannot be recomputed
from a constant. Choice: StitchVM keeps it as a learnable state `class_token` (D,), initialised by
`VisionTail.mean_class_token` — the mean class token entering block j over the probe images — and trained
with the tail in stage 2. `forward_from(..., class_token=...)` also accepts a per-image (B, D) class token,
which is how the exactness test feeds the true one.

Per-token outputs ("h" of the stage-2 token loss, App. D.1) are the final layer's tokens (class token first)
after the final LayerNorm (ln_post / post_layernorm applied token-wise), shape (B, N+1, D).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Pixel statistics of OpenAI CLIP (open_clip.constants.OPENAI_DATASET_MEAN / STD, also the transformers default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Prefix(NamedTuple):
    """The features entering block j (the stage-1 target r^{≤j−1}(x))."""

    tokens: Tensor  # (B, N, D) patch tokens, row-major over the patch grid
    class_token: Tensor | None  # (B, D) class token entering block j; None for j = 1 (stem has none)


class TailOutput(NamedTuple):
    """Output of r^{≥j}."""

    embed: Tensor  # (B, E) image embedding (the library's image features; not L2-normalised)
    tokens: Tensor  # (B, N+1, D) final tokens after the final LayerNorm, class token first


class ClipPreprocess(nn.Module):
    """images in [0, 1] (B, 3, H, W) → resized to the tower's input size and normalised by mean/std."""

    def __init__(self, image_size: tuple[int, int], mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        self.image_size = tuple(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


class VisionTail(nn.Module):
    """Generic cut/re-join logic; subclasses only name the library's pieces.

    Subclasses set: `self.vision` (the wrapped module), `self.stem_conv` (nn.Conv2d), `self.blocks`
    (sequence of blocks), `self.width` D, `self.num_blocks` L, `self.embed_dim` E, `self.grid` (gh, gw),
    `self.image_size` (H, W), `self.preprocess`, and implement `_start(tokens)`, `_run_block(k, x)`,
    `_finish(x)` and `_embedding_params()`.
    """

    vision: nn.Module
    stem_conv: nn.Conv2d
    preprocess: nn.Module
    width: int
    num_blocks: int
    embed_dim: int
    grid: tuple[int, int]
    image_size: tuple[int, int]

    # ---- library-specific pieces -------------------------------------------------------------------------
    def _start(self, tokens: Tensor) -> Tensor:
        """(B, N, D) stem tokens → (B, N+1, D): prepend class token, add pos-embed, ln_pre (library order)."""
        raise NotImplementedError

    def _run_block(self, k: int, x: Tensor) -> Tensor:
        """Run block k (0-based) on the sequence x (B, N+1, D)."""
        raise NotImplementedError

    def _finish(self, x: Tensor) -> TailOutput:
        """Final LayerNorm, pooling and projection of the block-L output (B, N+1, D)."""
        raise NotImplementedError

    def _embedding_params(self) -> list[nn.Parameter]:
        """Parameters of the class-token / pos-embed / ln_pre step (used by the tail only when j = 1)."""
        raise NotImplementedError

    # ---- generic API -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def check_block(self, j: int) -> None:
        if not 1 <= j <= self.num_blocks:
            raise ValueError(f"j must be in [1, {self.num_blocks}] for this {self.num_blocks}-block tower; got {j}")

    def stem(self, pixels: Tensor) -> Tensor:
        """r^{≤0}: normalised pixels (B, 3, H, W) → patch tokens (B, N, D), no class token, no pos-embed."""
        if tuple(pixels.shape[-2:]) != self.image_size:
            raise ValueError(f"pixels must be {self.image_size}, got {tuple(pixels.shape[-2:])}; use .preprocess")
        x = self.stem_conv(pixels.to(self.stem_conv.weight.dtype))  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)

    def prefixes(self, pixels: Tensor, j_values: Sequence[int]) -> dict[int, Prefix]:
        """All requested block inputs r^{≤j−1}(x) in one pass over the tower.

        Args:
            pixels: (B, 3, H, W) normalised pixels (see `preprocess`).
            j_values: 1-based block indices.
        Returns:
            {j: Prefix(tokens (B, N, D), class_token (B, D) or None for j = 1)}.
        """
        for j in j_values:
            self.check_block(j)
        out: dict[int, Prefix] = {}
        tokens = self.stem(pixels)  # (B, N, D)
        if 1 in j_values:
            out[1] = Prefix(tokens, None)
        x = self._start(tokens)  # (B, N+1, D)
        for k in range(max(j_values) - 1):
            x = self._run_block(k, x)
            if k + 2 in j_values:  # block k (0-based) output is the input of block j = k + 2 (1-based)
                out[k + 2] = Prefix(x[:, 1:], x[:, 0])
        return out

    def prefix(self, pixels: Tensor, j: int) -> Tensor:
        """Patch tokens entering block j, r^{≤j−1}(x): (B, N, D). See the module docstring for j = 1."""
        return self.prefixes(pixels, [j])[j].tokens

    @torch.no_grad()
    def mean_class_token(self, pixels: Tensor, j: int) -> Tensor:
        """Mean over the batch of the class token entering block j > 1: (D,). Initialises StitchVM's class token."""
        if j == 1:
            raise ValueError("j = 1 has no learned class token: the tail re-adds the class embedding itself")
        return self.prefixes(pixels, [j])[j].class_token.mean(0)

    def forward_from(self, patch_tokens: Tensor, j: int, class_token: Tensor | None = None) -> TailOutput:
        """r^{≥j}: run the rest of the tower on patch tokens that stand in for r^{≤j−1}(x).

        Args:
            patch_tokens: (B, N, D).
            j: 1-based block index; j = 1 re-applies class token + pos-embed + ln_pre, then all blocks.
            class_token: for j > 1, the class token entering block j, (D,) or (B, D). Must be None for j = 1.
        Returns:
            TailOutput(embed (B, E), tokens (B, N+1, D)).
        """
        self.check_block(j)
        B, N, D = patch_tokens.shape
        if (N, D) != (self.num_tokens, self.width):
            raise ValueError(f"patch_tokens must be (B, {self.num_tokens}, {self.width}), "
                             f"got {tuple(patch_tokens.shape)}")
        if j == 1:
            if class_token is not None:
                raise ValueError("class_token must be None for j = 1 (the tower's own class embedding is used)")
            x = self._start(patch_tokens)
        else:
            if class_token is None:
                raise ValueError(f"j = {j} > 1 needs the class token entering block j (see mean_class_token)")
            cls = class_token.to(patch_tokens.dtype).expand(B, D).unsqueeze(1)  # (B, 1, D)
            x = torch.cat([cls, patch_tokens], dim=1)
        for k in range(j - 1, self.num_blocks):
            x = self._run_block(k, x)
        return self._finish(x)

    def encode(self, images: Tensor) -> TailOutput:
        """The full tower on images in [0, 1]: equals the library's image embedding (+ final tokens)."""
        return self.forward_from(self.stem(self.preprocess(images)), 1)

    def suffix_named_parameters(self, j: int) -> list[tuple[str, nn.Parameter]]:
        """Parameters used by `forward_from(·, j)`: the trained part of the tail in stage 2 (and what is saved)."""
        self.check_block(j)
        unused = {id(p) for p in self.stem_conv.parameters()}
        if j > 1:
            unused |= {id(p) for p in self._embedding_params()}
            for k in range(j - 1):
                unused |= {id(p) for p in self.blocks[k].parameters()}
        # names relative to the wrapped library module, so they match its own state_dict
        return [(n, p) for n, p in self.vision.named_parameters() if id(p) not in unused]


class OpenCLIPTail(VisionTail):
    """Tail over an open_clip `VisionTransformer` (`model.visual`); the wrapped module is used, not copied."""

    def __init__(self, visual: nn.Module, preprocess: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if visual.attn_pool is not None:
            raise NotImplementedError("open_clip towers with attentional pooling are not supported by VisionTail")
        if visual.pool_type not in ("tok", "avg"):
            raise NotImplementedError(f"open_clip pool_type {visual.pool_type!r} is not supported "
                                      f"(need 'tok' or 'avg')")
        self.vision = visual
        self.stem_conv = visual.conv1
        self.blocks = visual.transformer.resblocks
        self.width = visual.conv1.out_channels
        self.num_blocks = len(self.blocks)
        self.embed_dim = visual.proj.shape[1] if visual.proj is not None else self.width
        self.grid = tuple(visual.grid_size)
        self.image_size = tuple(visual.image_size)
        self.preprocess = preprocess if preprocess is not None else ClipPreprocess(self.image_size)

    def _start(self, tokens: Tensor) -> Tensor:
        v = self.vision
        cls = v.class_embedding.to(tokens.dtype).view(1, 1, -1).expand(tokens.shape[0], 1, -1)
        x = torch.cat([cls, tokens], dim=1) + v.positional_embedding.to(tokens.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def _run_block(self, k: int, x: Tensor) -> Tensor:
        if not self.vision.transformer.batch_first:
            return self.blocks[k](x.transpose(0, 1)).transpose(0, 1)
        return self.blocks[k](x)

    def _finish(self, x: Tensor) -> TailOutput:
        v = self.vision
        tokens = v.ln_post(x)  # (B, N+1, D), token-wise LayerNorm
        if v.final_ln_after_pool:  # library order: pool, then ln_post on the pooled vector
            pooled = v.ln_post(x[:, 1:].mean(1) if v.pool_type == "avg" else x[:, 0])
        else:
            pooled = tokens[:, 1:].mean(1) if v.pool_type == "avg" else tokens[:, 0]
        embed = pooled @ v.proj if v.proj is not None else pooled
        return TailOutput(embed, tokens)

    def _embedding_params(self) -> list[nn.Parameter]:
        v = self.vision
        return [v.class_embedding, v.positional_embedding, *v.ln_pre.parameters()]


class HFCLIPTail(VisionTail):
    """Tail over a transformers `CLIPVisionModel` or `CLIPVisionModelWithProjection` (used, not copied).

    For a bare `CLIPVisionModel` the embedding is the pooled (post-LayerNorm) class token, E = D.
    """

    def __init__(self, vision_model: nn.Module, preprocess: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        if isinstance(vision_model, CLIPVisionModelWithProjection):
            core, self.projection = vision_model.vision_model, vision_model.visual_projection
        elif isinstance(vision_model, CLIPVisionModel):
            core, self.projection = vision_model, None
        else:
            raise TypeError(f"HFCLIPTail needs a CLIPVisionModel[WithProjection], got {type(vision_model).__name__}")
        self.vision = vision_model
        self.core = core
        emb = core.embeddings
        self.stem_conv = emb.patch_embedding
        self.blocks = core.encoder.layers
        self.width = emb.embed_dim
        self.num_blocks = len(self.blocks)
        self.embed_dim = self.projection.out_features if self.projection is not None else self.width
        side = emb.image_size // emb.patch_size
        self.grid = (side, side)
        self.image_size = (emb.image_size, emb.image_size)
        self.preprocess = preprocess if preprocess is not None else ClipPreprocess(self.image_size)

    def _start(self, tokens: Tensor) -> Tensor:
        emb = self.core.embeddings
        cls = emb.class_embedding.to(tokens.dtype).view(1, 1, -1).expand(tokens.shape[0], 1, -1)
        x = torch.cat([cls, tokens], dim=1) + emb.position_embedding(emb.position_ids)
        return self.core.pre_layrnorm(x)

    def _run_block(self, k: int, x: Tensor) -> Tensor:
        return self.blocks[k](x, None)  # vision tower: no attention mask

    def _finish(self, x: Tensor) -> TailOutput:
        tokens = self.core.post_layernorm(x)  # token-wise, so tokens[:, 0] is the library's pooler_output
        pooled = tokens[:, 0]
        embed = self.projection(pooled) if self.projection is not None else pooled
        return TailOutput(embed, tokens)

    def _embedding_params(self) -> list[nn.Parameter]:
        emb = self.core.embeddings
        return [emb.class_embedding, *emb.position_embedding.parameters(), *self.core.pre_layrnorm.parameters()]


def make_tail(vision: nn.Module, preprocess: Callable[[Tensor], Tensor] | None = None) -> VisionTail:
    """Wrap a reward's `.vision` tower (not copied) in the matching VisionTail."""
    from open_clip.transformer import VisionTransformer

    if isinstance(vision, VisionTransformer):
        return OpenCLIPTail(vision, preprocess)
    return HFCLIPTail(vision, preprocess)


def tail_kind(tail: VisionTail) -> str:
    """Short name of the tail implementation, recorded in stitchvm.json."""
    return "open_clip" if isinstance(tail, OpenCLIPTail) else "hf_clip"
