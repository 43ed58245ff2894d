"""The SD3 MMDiT forward pass in pieces, so a caller can stop after block i, branch, and resume.

``SD3Transformer2DModel.forward`` is one call: patchify + position embedding, timestep/pooled-text embedding
(AdaLN conditioning), caption projection, the joint blocks, the final AdaLN norm, the projection and unpatchify.
Steering needs to run the first i blocks of one half of a CFG batch with gradients and the rest without, or to
keep the block-i hidden states of the unconditional half for the StitchVM head (rl/steering/guides.py). These
functions are that forward, split at block boundaries; ``forward`` chains them and equals
``transformer(...)`` exactly (tests/rl/steering/test_guides.py), so the pieces cannot drift from diffusers.

Not supported (refused by ``check_plain``): gradient checkpointing during a grad-enabled run (the pieces run the
blocks directly), ControlNet residuals, IP-Adapter and skip-layer guidance; none are used by the steering code.

    symbol    here       shape
    x         hidden     (B, N, D)   image tokens, N = (h/p)(w/p)
    c         context    (B, L, D)   text tokens (None after the last, context_pre_only block)
    temb      temb       (B, D)      timestep + pooled-text embedding (AdaLN input)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

NUM_TRAIN_TIMESTEPS = 1000  # SD3 conditions on timestep = sigma * 1000 (policies/flow.py)


class Stream(NamedTuple):
    """The state between two joint blocks."""

    hidden: Tensor  # (B, N, D)
    context: Tensor | None  # (B, L, D)
    temb: Tensor  # (B, D)

    def detach(self) -> "Stream":
        return Stream(self.hidden.detach(), None if self.context is None else self.context.detach(),
                      self.temb.detach())

    def cat(self, other: "Stream") -> "Stream":
        """Rows of ``self`` then rows of ``other`` (CFG order: unconditional first)."""
        if (self.context is None) != (other.context is None):
            raise ValueError("cannot concatenate streams cut at different blocks")
        context = None if self.context is None else torch.cat([self.context, other.context])
        return Stream(torch.cat([self.hidden, other.hidden]), context, torch.cat([self.temb, other.temb]))


def num_blocks(transformer: nn.Module) -> int:
    return len(transformer.transformer_blocks)


def check_plain(transformer: nn.Module) -> None:
    """Refuse transformer set-ups whose forward the pieces do not reproduce."""
    if getattr(transformer, "gradient_checkpointing", False):
        raise ValueError("rl.steering runs the MMDiT blocks itself and does not apply gradient checkpointing: call "
                         "transformer.disable_gradient_checkpointing() for steering")


def embed(transformer: nn.Module, z: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor) -> Stream:
    """Patchify + position embedding, AdaLN conditioning and caption projection.

    Args:
        z: (B, C, h, w) latents (cast to the transformer's dtype).
        sigma: (B,) noise levels; the timestep is ``sigma * 1000`` in float32, as ``FlowPolicy.velocity`` passes it.
        embeds: (B, L, D_joint) prompt embeddings.  pooled: (B, D_pool).
    """
    dtype = transformer.pos_embed.proj.weight.dtype
    hidden = transformer.pos_embed(z.to(dtype)).contiguous()  # pos_embed's flatten+transpose is non-contiguous
    temb = transformer.time_text_embed(sigma.float() * NUM_TRAIN_TIMESTEPS, pooled)
    context = transformer.context_embedder(embeds)
    return Stream(hidden, context, temb)


def run_blocks(transformer: nn.Module, stream: Stream, start: int, stop: int) -> Stream:
    """Joint blocks ``start .. stop-1`` (0-based, as ``transformer.transformer_blocks[start:stop]``)."""
    hidden, context = stream.hidden, stream.context
    for block in transformer.transformer_blocks[start:stop]:
        # the last block of the full model is context_pre_only: it returns None for the text stream
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=stream.temb)
    return Stream(hidden, context, stream.temb)


def finish(transformer: nn.Module, stream: Stream, height: int, width: int) -> Tensor:
    """Final AdaLN norm, projection and unpatchify of the last block's image tokens: (B, C_out, height, width)."""
    p = transformer.config.patch_size
    out = transformer.proj_out(transformer.norm_out(stream.hidden, stream.temb))  # (B, N, p*p*C_out)
    B, c_out = out.shape[0], transformer.out_channels
    out = out.reshape(B, height // p, width // p, p, p, c_out)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(B, c_out, height, width)


def forward(transformer: nn.Module, z: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
    """The whole forward from the pieces; equals ``transformer(z, embeds, pooled, sigma * 1000)``."""
    stream = run_blocks(transformer, embed(transformer, z, sigma, embeds, pooled), 0, num_blocks(transformer))
    return finish(transformer, stream, z.shape[-2], z.shape[-1])
