"""Noise-level experts (ours): one critic per band of sigma; each latent is valued by the expert of its band.

Why (docs/critic.md, session 6). Stage 2 of a StitchVM spends the tail's capacity on every sigma its law draws.
Under the uniform law most of that goes to high-sigma targets that are largely irreducible. A tail distilled at
low sigma (with the policy's own samples) ranks the policy's latents better at sigma <= 0.5. At sigma >= 0.75
the uniform tail ranks better. Routing by sigma keeps the better of the two at every level, at the cost of one
expert per latent: a batch whose latents fall in two bands runs two experts, each on its own rows.

    expert(sigma) = experts[k] for the first k with sigma <= upper[k];  upper increasing, upper[-1] = 1

The experts are ordinary critics (critics/base.py); the router meets the same contract, so trainers and steering
use it unchanged. Steering's fused CUDA-graph step is StitchVM-specific and falls back to the generic guide.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class SigmaRoutedCritic(nn.Module):
    """V(z_t) = experts[k](z_t) for sigma in (upper[k-1], upper[k]] (band 0 starts at sigma = 0)."""

    dense = True

    def __init__(self, experts: Sequence[nn.Module], upper: Sequence[float]):
        super().__init__()
        if len(experts) < 1 or len(experts) != len(upper):
            raise ValueError(f"one upper sigma per expert: got {len(experts)} experts and {len(upper)} bounds")
        bounds = [float(u) for u in upper]
        if any(b <= a for a, b in zip(bounds, bounds[1:])) or bounds[0] <= 0 or bounds[-1] != 1.0:
            raise ValueError(f"upper must increase strictly from > 0 to 1.0 (the last expert serves up to sigma = 1), "
                             f"got {bounds}")
        spaces = {(e.latent_channels, e.latent_size) for e in experts}
        if len(spaces) != 1:
            raise ValueError(f"the experts value different latent spaces {sorted(spaces)}: build them for one policy")
        if not all(getattr(e, "dense", False) for e in experts):
            raise ValueError("every expert needs a value at every sigma (dense): the terminal critic cannot be one")
        self.experts = nn.ModuleList(experts)
        self.upper = tuple(bounds)
        self.latent_channels, self.latent_size = spaces.pop()

    def expert_index(self, sigma: Tensor) -> Tensor:
        """(B,) sigma -> (B,) long index of the serving expert."""
        inner = torch.tensor(self.upper[:-1], dtype=sigma.dtype, device=sigma.device)
        return torch.bucketize(sigma, inner)  # k with upper[k-1] < sigma <= upper[k]

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        """(B,) float32, differentiable in z_t wherever the serving experts are."""
        b = z_t.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=z_t.device)
        s = s.expand(b).contiguous() if s.dim() == 0 else s.contiguous()
        if s.shape != (b,):
            raise ValueError(f"sigma must be a float or one per latent ({b},), got shape {tuple(s.shape)}")
        index = self.expert_index(s)
        first = int(index[0])
        if bool((index == first).all()):  # one band (the common case: trainers and steering pass one sigma)
            return self.experts[first].value(z_t, sigma, prompts)
        out = None
        for k, expert in enumerate(self.experts):
            rows = (index == k).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = expert.value(z_t[rows], s[rows], None if prompts is None else [prompts[i] for i in rows.tolist()])
            out = torch.zeros(b, dtype=part.dtype, device=part.device) if out is None else out
            out = out.index_put((rows,), part)  # out of place: keeps the graph to every expert's rows
        return out

    def forward(self, z_t: Tensor, sigma: Tensor | float, prompts: Sequence[str] | None = None) -> Tensor:
        return self.value(z_t, sigma, prompts)
