"""vae_stitch: the paper's VAE-only baseline — StitchVM with an identity head on the noisy latent.

Paper (arXiv 2605.19804) Table 5, "VAE stitch": the reward tail is stitched directly onto the noisy VAE latent,
with no diffusion blocks in front of it, then trained exactly as StitchVM:

    V^{VAE, j}(z_t) = r_φ^{≥j}( s_ψ( z_t ) )          (Eq. 6 with u_θ^{≤i} replaced by the identity)

Notation          code
  z_t             LatentHead output: the normalised noisy latent itself, (B, C, h, w), read as C-channel "head
                  features" on the latent grid (h, w). It ignores sigma (the paper's baseline has no timestep).
  s_ψ             the same Stitch as StitchVM (critics/stitchvm.py): 1×1 conv from C channels initialised by the
                  closed-form fit, bilinear Up from (h, w) to the reward patch grid, zero-initialised G_ψ
  r_φ^{≥j}        the same VisionTail, a trainable copy of the reward tower

The stage-1 fit sweeps j only (there is no i): `search_latent`. Stage 2 is `critics.distill.distill` unchanged
(pass `save_fn=save_vae_stitch` for its checkpoints). The model object is a `StitchVM` whose head is a
`LatentHead`, so `value`, `features` and the Critic contract are shared.

Files written by `save_vae_stitch`: stitch.safetensors, tail.safetensors (as StitchVM) and vae_stitch.json. The
pairing identity is the VAE (its encoder weights and latent normalisation): a vae_stitch critic works with any
policy of the same latent space, whatever its transformer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from rl.checkpoint import verify_dir, write_dir_atomically
from critics.interface import InterfaceResult, collect_features, fit_linear, MAX_TAIL_BLOCK
from critics.stitchvm import (CLASS_TOKEN_KEY, CRITIC_META_FILES, STITCH_FILE, TAIL_FILE, Stitch, StitchVM, _versions,
                              check_critic_kind, make_score, read_critic_file, stitch_kwargs, vision_fingerprint)
from critics.tails import make_tail, tail_kind

FORMAT_VERSION = 1
META_FILE = CRITIC_META_FILES["vae_stitch"]  # "vae_stitch.json"
KIND = "vae_stitch"
LATENT_TAP = 0  # the "block" index of the identity head in stage-1 caches (no DiT block is run)


class LatentHead(nn.Module):
    """Identity head: z_t (B, C, h, w) → the same tensor as head features (B, C, h, w).

    Has the attributes StitchVM, stage 1 and stage 2 read from a head (`i`, `width`, `grid`, `latent_channels`,
    `latent_size`, `device`, `forward_taps`). No parameters.

    Args:
        latent_channels: C of the policy's VAE.  latent_size: h = w of the latents the critic works at.
        vae_fingerprint: identity of the VAE whose latents these are (see `vae_fingerprint`).
    """

    i = 0  # no diffusion blocks

    def __init__(self, latent_channels: int, latent_size: int, vae_fingerprint: str):
        super().__init__()
        self.latent_channels = self.width = latent_channels
        self.latent_size = latent_size
        self.grid = (latent_size, latent_size)
        self.vae_fingerprint = vae_fingerprint
        # an empty buffer so that .to(device) moves "the head" and `device` can say where it is
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def forward(self, z_t: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        """(B, C, h, w) → (B, C, h, w); sigma is ignored (the baseline has no timestep input)."""
        if z_t.dim() != 4 or tuple(z_t.shape[1:]) != (self.latent_channels, *self.grid):
            raise ValueError(f"z_t must be (B, {self.latent_channels}, {self.latent_size}, {self.latent_size}) for "
                             f"this vae_stitch critic; got {tuple(z_t.shape)}")
        return z_t

    def forward_taps(self, z_t: Tensor, sigma: Tensor | float, taps: Sequence[int]) -> dict[int, Tensor]:
        """Stage-1 interface (critics.interface.collect_features): the only tap is LATENT_TAP = 0."""
        if list(taps) != [LATENT_TAP]:
            raise ValueError(f"the identity head has a single tap {LATENT_TAP}; got {list(taps)}")
        return {LATENT_TAP: self(z_t, sigma)}


def vae_fingerprint(vae: nn.Module) -> str:
    """sha256 over the VAE's encoder side (encoder + quant_conv, bf16-rounded) and its latent normalisation.

    These fix the latent space; the decoder does not, so a VAE with a retrained decoder keeps its fingerprint.
    """
    h = hashlib.sha256()
    h.update(f"scaling={vae.config.scaling_factor} shift={vae.config.shift_factor}".encode())
    for name, p in vae.named_parameters():
        if not name.startswith(("encoder.", "quant_conv.")):
            continue
        t = p.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def latent_head(policy) -> LatentHead:
    """The identity head for a FlowPolicy's latent space, on the policy's device."""
    return LatentHead(policy.latent_channels, policy.latent_size, vae_fingerprint(policy.vae)).to(policy.device)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1 over j only
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def search_latent(head: LatentHead, tail, images: Tensor, latents: Tensor, j_values: Sequence[int] | None = None,
                  pinned_j: int | None = None, sigmas: Tensor | None = None,
                  generator: torch.Generator | None = None, batch_size: int = 16,
                  criterion: str = "rel_mse") -> InterfaceResult:
    """Fit Eq. 7 with u = identity for every reward block j; the result has the single row i = 0.

    Args: as critics.interface.search (j_values default 1..min(4, L); pinned_j fixes j).
    """
    if criterion not in ("rel_mse", "mse"):
        raise ValueError(f"criterion must be 'rel_mse' or 'mse'; got {criterion!r}")
    j_max = min(MAX_TAIL_BLOCK, tail.num_blocks)
    j_values = list(range(1, j_max + 1)) if j_values is None else list(j_values)
    if pinned_j is not None and pinned_j not in j_values:
        j_values = sorted(set(j_values) | {pinned_j})
    for j in j_values:
        if not 1 <= j <= j_max:
            raise ValueError(f"reward block j = {j} out of range: need 1 ≤ j ≤ {j_max} (reward blocks, paper "
                             f"searches j ≤ {MAX_TAIL_BLOCK})")
    feats = collect_features(head, tail, images, latents, [LATENT_TAP], j_values, sigmas, generator, batch_size)
    X = feats.dit[LATENT_TAP]
    fits = {(LATENT_TAP, j): fit_linear(X, feats.tail[j]) for j in j_values}
    mse = torch.tensor([[fits[(LATENT_TAP, j)].mse for j in j_values]], dtype=torch.float64)
    rel = torch.tensor([[fits[(LATENT_TAP, j)].rel_mse for j in j_values]], dtype=torch.float64)
    grid = rel if criterion == "rel_mse" else mse
    best_j = pinned_j if pinned_j is not None else j_values[int(torch.argmin(grid))]
    best = (LATENT_TAP, best_j)
    return InterfaceResult(grid, mse, rel, [LATENT_TAP], j_values, best, criterion, {best: fits[best]})


def build_vae_stitch(policy, reward: nn.Module, j: int, W: Tensor, b: Tensor, score_kind: str, *,
                     probe_pixels: Tensor | None = None, preprocess: Callable[[Tensor], Tensor] | None = None,
                     bottleneck_ratio: int = 8, stitch_blocks: int = 0, meta: dict | None = None) -> StitchVM:
    """Assemble a vae_stitch critic at initialisation from a stage-1 fit (W, b): (D_tail, C), (D_tail,)."""
    head = latent_head(policy)
    teacher_tail = make_tail(reward.vision, preprocess)
    tail = make_tail(copy.deepcopy(reward.vision), preprocess)
    class_token = None
    if j > 1:
        if probe_pixels is None:
            raise ValueError(f"j = {j} > 1: pass probe_pixels to initialise the class token entering block j")
        class_token = tail.mean_class_token(probe_pixels, j)
    stitch = Stitch(head.width, tail.width, head.grid, tail.grid, W, b, bottleneck_ratio, stitch_blocks).to(head.device)
    meta = dict(meta or {})
    meta["reward_fingerprint"] = vision_fingerprint(teacher_tail)
    return StitchVM(head, stitch, tail, j, make_score(reward, score_kind), class_token, meta)


# ---------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------
def save_vae_stitch(path_dir: str | os.PathLike, model: StitchVM, meta: dict | None = None) -> None:
    """Write stitch.safetensors, tail.safetensors and vae_stitch.json to `path_dir`, atomically.

    Same signature as save_stitchvm, so it can be passed to distill(..., save_fn=save_vae_stitch).
    """
    head, tail = model.head, model.tail
    if not isinstance(head, LatentHead):
        raise TypeError(f"save_vae_stitch needs a StitchVM with a LatentHead; got {type(head).__name__} "
                        f"(use critics.stitchvm.save_stitchvm)")
    info = {**model.meta, **(meta or {})}
    if "reward_fingerprint" not in info:
        raise ValueError("model.meta lacks 'reward_fingerprint': build the critic with build_vae_stitch")
    info.update({
        "format_version": FORMAT_VERSION, "kind": KIND, "j": model.j, "score_kind": model.score.kind,
        "latent_channels": head.latent_channels, "latent_size": head.latent_size,
        "vae_fingerprint": head.vae_fingerprint,
        "tail_kind": tail_kind(tail), "tail_width": tail.width, "tail_grid": list(tail.grid),
        "tail_num_blocks": tail.num_blocks, "tail_image_size": list(tail.image_size), "embed_dim": tail.embed_dim,
        **model.stitch.config(), "versions": _versions(),
    })
    stitch_sd = {k: v.detach().cpu().contiguous() for k, v in model.stitch.state_dict().items()}
    tail_sd = {k: v.detach().cpu().clone().contiguous() for k, v in model.tail_named_parameters()}

    def write(tmp: str) -> None:
        save_file(stitch_sd, os.path.join(tmp, STITCH_FILE))
        save_file(tail_sd, os.path.join(tmp, TAIL_FILE))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)

    write_dir_atomically(path_dir, write, manifest=True)


def read_vae_stitch_meta(path_dir: str | os.PathLike) -> dict:
    """vae_stitch.json of a saved critic; FileNotFoundError naming the first missing file."""
    path_dir = os.fspath(path_dir)
    check_critic_kind(path_dir, "vae_stitch")
    for name in (META_FILE, STITCH_FILE, TAIL_FILE):
        p = os.path.join(path_dir, name)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"vae_stitch checkpoint incomplete: {p} does not exist")
    return read_critic_file(os.path.join(path_dir, META_FILE))


def load_vae_stitch(path_dir: str | os.PathLike, policy, reward: nn.Module,
                    preprocess: Callable[[Tensor], Tensor] | None = None) -> StitchVM:
    """Rebuild a saved vae_stitch critic for `policy`'s latent space and a copy of `reward.vision`.

    Raises:
        FileNotFoundError: a checkpoint file is missing.
        ValueError: the policy's latent space (channels, size, VAE) or the reward tower is not the one the critic
            was built for.
    """
    path_dir = os.fspath(path_dir)
    verify_dir(path_dir)  # sizes + sha256 against manifest.json
    meta = read_vae_stitch_meta(path_dir)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != KIND:
        raise ValueError(f"{path_dir}: not a vae_stitch checkpoint of format {FORMAT_VERSION} "
                         f"(kind {meta.get('kind')!r}, format {meta.get('format_version')!r})")
    if meta.get("value_target") is not None:  # the build refuses it; a file edited or written elsewhere may not
        raise ValueError(f"critic at {path_dir} regresses onto {meta['value_target'].get('_component_', '?')} "
                         f"(value_target), but a vae_stitch critic is loaded only for its tower's own reward: "
                         f"rebuild it without onpolicy.target")
    head = latent_head(policy)
    built_for = (f"latents {meta['latent_channels']}×{meta['latent_size']}² of VAE {meta['vae_fingerprint'][:12]} "
                 f"(backbone {meta.get('backbone', '<unnamed>')})")
    if (head.latent_channels, head.latent_size) != (meta["latent_channels"], meta["latent_size"]):
        raise ValueError(f"critic at {path_dir} was built for another latent space: {built_for}; the policy has "
                         f"latents {head.latent_channels}×{head.latent_size}²")
    if head.vae_fingerprint != meta["vae_fingerprint"]:
        raise ValueError(f"critic at {path_dir} was built for another latent space: {built_for}; the policy's VAE "
                         f"has fingerprint {head.vae_fingerprint[:12]}")

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
        raise ValueError(f"{os.path.join(path_dir, TAIL_FILE)} does not match a tail from block {j}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tail_sd[name])
    stitch = Stitch(head.width, meta["tail_width"], head.grid, meta["tail_grid"], **stitch_kwargs(meta))
    stitch.load_state_dict(read_critic_file(os.path.join(path_dir, STITCH_FILE)), strict=True)
    stitch.to(head.device)
    if class_token is not None:
        class_token = class_token.to(head.device)
    keep = {k: v for k, v in meta.items() if k in ("backbone", "reward", "image_size", "reward_fingerprint")}
    return StitchVM(head, stitch, tail, j, make_score(reward, meta["score_kind"]), class_token, keep)
