"""The critic contract every trainer and steering method meets.

A critic estimates the value of a noisy latent, V_t(z_t) = E[r(x_0) | z_t]:

    value(z_t: (B, C, h, w), sigma: float | (B,), prompts: list[str]) -> (B,) float32

differentiable in z_t where the critic allows it (``tweedie``, ``stitchvm``; a critic that never is, ``mc``, says
so with ``differentiable = False``). ``dense`` says whether values at
sigma > 0 exist (``terminal`` has a value at sigma = 0 only). ``latent_channels`` / ``latent_size`` let a
trainer refuse a critic built for another latent space before any compute. A trainer never knows which
critic it holds.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Critic(Protocol):
    dense: bool
    latent_channels: int
    latent_size: int

    def value(self, z_t: Tensor, sigma: Tensor | float, prompts: list[str]) -> Tensor: ...


def check_pairing(critic: Critic, latent_channels: int, latent_size: int, what: str = "policy") -> None:
    """Refuse a critic whose latent space differs from the policy's, saying which is which."""
    if (critic.latent_channels, critic.latent_size) != (latent_channels, latent_size):
        raise ValueError(
            f"critic {type(critic).__name__} works on latents ({critic.latent_channels}, {critic.latent_size}, "
            f"{critic.latent_size}) but the {what} produces ({latent_channels}, {latent_size}, {latent_size}): "
            f"build or load a critic for this {what}'s VAE and resolution")
