"""Stage 2 of StitchVM: distil the reward model into the stitched value model (paper §3 Eq. 8, App. D.1).

Concept (Eq. 8): L = E ‖V(z_t) − r(x0)‖², minimised by E[r(x0) | z_t]; z_t comes from forward-noising real
images (off-policy). The loss actually used matches the image side only (the text tower is never run):

    CLIP / HPSv2 ("embed_token"):  L = ‖ẽ_SVM − ẽ_RM‖² + λ_tok ‖h_SVM − h_RM‖² [+ λ_score E Δᵀ M Δ] [+ λ_own E (Δ·t)²]
    Aesthetic    ("smooth_l1"):    L = SmoothL1(h_SVM, h_RM) + SmoothL1(ẽ_SVM, ẽ_RM) + SmoothL1(a_SVM, a_RM)

Notation          code
  ẽ               L2-normalised image embedding (B, E)
  h               per-token outputs of r^{≥j}: final tokens after the final LayerNorm (B, N+1, D)
  a               aesthetic score reward.score_from_image_embed(e) (B,)
  SVM / RM        student StitchVM on z_t / teacher reward tower on the clean image x0 (or on D(z0): teacher_input)

Caption-score term (ours, off by default; ``lambda_score``): a prompt-dependent value is the cosine ẽ·t of the image
embedding with the prompt's text embedding t, so what the critic must get right is ẽ along caption directions. With
Δ = ẽ_SVM − ẽ_RM and M = E_c[t_c t_cᵀ] over a bank of normalised caption embeddings (critics.build:
``score_captions``), Δᵀ M Δ = E_c[(ẽ_SVM·t_c − ẽ_RM·t_c)²] is the mean squared error of the *score* against every
caption of the bank at once; the factor E (the embedding width; tr M = 1) makes it equal ‖Δ‖² for isotropic captions.
On the Shapes StitchVM the embedding error is ~5x more concentrated on caption directions than an isotropic error
of the same size (docs/critic.md, session 6), which is why ranking lags retrieval.

Own-caption score term (ours, off by default; ``lambda_own_score``): E (Δ·t)² with t the normalised text embedding of
the image's *own* caption (the prompt a policy sample was drawn for, a render's caption). Δ·t = ẽ_SVM·t − ẽ_RM·t is
the student's error on the very score the critic serves for that image, up to the reward's affine scale: the term
is the value's squared error against the teacher, where λ_score's term spreads the same budget over every caption
of a bank (it lowered the error on caption directions in session 6 but not the ranking). With E it equals ‖Δ‖² for
an error isotropic in direction. Needs captions and the reward's text side (``text_embed_fn``); a caption dropped
for the head's CFG training still scores against the real one.

Reductions: the embedding term sums over E and averages over the batch (‖·‖² of unit vectors, ∈ [0, 4]); the token
term is a mean over batch, tokens and channels. A summed token norm over 257 × 1024 entries (ViT-L/14) would dwarf
the embedding term and make the paper's λ_tok = 1 meaningless; the per-element mean keeps both O(1).

Choices the paper leaves open:
- What the teacher sees (``teacher_input``). "image" (the default, and every critic shipped before session 21): the
  clean image x0, the reward of the data. "decoded": D(z0), the image of the very latent z0 the student's z_t is
  noised from. The value of a latent policy is E[r(D(z0)) | z_t], the reward of the image the policy outputs, and
  with "decoded" every target is a function of the student's clean latent, so at σ → 0 there is nothing left that
  the student cannot see. With "image" a render's target r(x0) carries what the VAE round trip loses: on the
  policy's Shapes samples r(D(E(D(z0)))) ranks as r(D(z0)) does only at ρ .967-.986 (std .02-.03 of the score;
  docs/critic.md, session 21). (The student sees z_t built from z0 = E(x0), or, for a policy sample that carries its
  own latent, from that latent: what the critic is used on. On Shapes E(D(z0)) differs from the policy's z0 by
  14-16 % of its norm, more than the noise at σ = 0.1.)
- Noise levels: logit-normal(0, 1) by default (a centre-biased law on (0, 1)), or uniform.
- Learning rate: linear warm-up for `warmup_steps`, then constant (short 5-epoch finetune from a good init), or
  cosine to 0 at `max_steps` (`lr_decay`).
- Stitch + tail are fully finetuned (AdamW, stitch at 5× lr); the DiT head and the teacher are frozen.
"""

from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from critics.stitchvm import StitchVM, save_stitchvm
from critics.tails import make_tail
from rl.checkpoint import (optimizer_state_from_tensors, optimizer_state_to_tensors, scheduler_state_from_json,
                           scheduler_state_to_json)

STATE_TENSORS = "distill_state.safetensors"  # a checkpoint's training state (critics.build resume): float32 weights
STATE_JSON = "distill_state.json"            # and optimizer moments; the step, scheduler and noise generator
LOSSES = ("embed_token", "smooth_l1")
TEACHER_INPUTS = ("image", "decoded")
SIGMA_LAWS = ("logit_normal", "uniform")
LR_DECAYS = ("constant", "cosine")
COMPILE_MODES = ("none", "default", "reduce-overhead")  # DistillConfig.compile: torch.compile modes
# Teacher sanity check: the VisionTail re-implementation of the reward tower must agree with reward.image_embed.
TEACHER_MIN_COSINE = 0.999


@dataclass
class DistillConfig:
    """Stage-2 hyper-parameters (paper App. D.1 defaults)."""

    lr: float = 1e-5
    """AdamW learning rate of the tail (r^{≥j}, full finetune)."""
    stitch_lr_mult: float = 5.0
    """The stitch s_ψ trains at lr × stitch_lr_mult (paper: 5)."""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0)."""
    warmup_steps: int = 100
    """Linear warm-up steps from lr/warmup_steps to lr; then `lr_decay`."""
    lr_decay: str = "constant"
    """After warm-up: "constant" (paper: unspecified) or "cosine" to 0 at max_steps (needs max_steps)."""
    batch_size: int = 128
    """Images per optimiser step (paper: global batch 128). The data stream is re-chunked to this size."""
    micro_batch_size: int | None = None
    """Images per forward/backward (gradient accumulation); None = batch_size."""
    epochs: int = 5
    """Passes over `data_iter` (paper: 5 epochs on AVA + HPDv2 images)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (None: run all epochs)."""
    lambda_tok: float = 1.0
    """Weight λ_tok of the token term of the "embed_token" loss (paper: 1)."""
    lambda_score: float = 0.0
    """Weight λ_score of the caption-score term E Δᵀ M Δ of the "embed_token" loss (module docstring; 0: off, the
    paper's loss). Needs the caption metric M (critics.build computes it from ``score_captions``)."""
    lambda_own_score: float = 0.0
    """Weight λ_own of the own-caption score term E (Δ·t)² of the "embed_token" loss, t the image's own caption
    (module docstring; 0: off). Needs captioned data and the reward's text embedding (``text_embed_fn``)."""
    sigma_sampling: str = "logit_normal"
    """Noise-level law of sigma: "logit_normal" (sigmoid of N(sigma_mean, sigma_std)) or "uniform" on [0, 1]."""
    sigma_mean: float = 0.0
    """Mean of the normal before the sigmoid (logit_normal)."""
    sigma_std: float = 1.0
    """Std of the normal before the sigmoid (logit_normal)."""
    loss: str = "embed_token"
    """"embed_token" (CLIP, DFN-CLIP, HPSv2) or "smooth_l1" (aesthetic; also matches the score)."""
    grad_clip: float | None = None
    """Max global grad norm of the trained parameters; None disables (the paper states no clipping)."""
    log_every: int = 10
    """Call `callback(step, stats)` every this many steps."""
    ckpt_every: int = 0
    """Save to `ckpt_dir` every this many steps (0: only at the end); ignored without ckpt_dir."""
    ckpt_dir: str | None = None
    """Directory for save_stitchvm checkpoints (overwritten atomically); None: no checkpoints."""
    caption_dropout: float = 0.1
    """Prompt-conditioned head only: the share of captions replaced by "" (as text-to-image training drops
    captions for CFG), so that the head also runs on null text (the image-only embedding of the retrieval check,
    and prompts a user leaves empty)."""
    seed: int = 0
    """Seed of the sigma / ε generator."""
    check_teacher: bool = True
    """On the first batch, check that the teacher tower reproduces reward.image_embed (cosine ≥ 0.999)."""
    teacher_input: str = "image"
    """What the teacher scores: "image", the clean image x0 of the batch, or "decoded", D(z0) of the latent z0 the
    student's z_t is noised from (module docstring; needs ``decode_fn``)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    compile: str = "none"
    """torch.compile the student's forward (head → stitch → tail) and the teacher's: "none" (eager), "default", or
    "reduce-overhead" (CUDA graphs: for small critics whose steps are bound by kernel launches, as the Shapes one).
    The compiled kernels round differently from eager ones, so a compiled build is another draw, not the same
    weights; the first steps pay the compilation."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {self.loss!r}")
        if self.sigma_sampling not in SIGMA_LAWS:
            raise ValueError(f"sigma_sampling must be one of {SIGMA_LAWS}; got {self.sigma_sampling!r}")
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ValueError("batch_size and micro_batch_size must be ≥ 1")
        if self.lr <= 0 or self.stitch_lr_mult <= 0 or self.warmup_steps < 0:
            raise ValueError("lr and stitch_lr_mult must be > 0 and warmup_steps ≥ 0")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}; got {self.lr_decay!r}")
        if self.lambda_score < 0:
            raise ValueError(f"lambda_score must be >= 0, got {self.lambda_score}")
        if self.lambda_score > 0 and self.loss != "embed_token":
            raise ValueError("lambda_score is a term of the 'embed_token' loss (prompt-dependent rewards); "
                             f"loss is {self.loss!r}")
        if not self.lambda_own_score >= 0:
            raise ValueError(f"lambda_own_score must be >= 0, got {self.lambda_own_score}")
        if self.lambda_own_score > 0 and self.loss != "embed_token":
            raise ValueError("lambda_own_score is a term of the 'embed_token' loss (prompt-dependent rewards); "
                             f"loss is {self.loss!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"teacher_input must be one of {TEACHER_INPUTS}; got {self.teacher_input!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}; got {self.compile!r}")
        if self.lr_decay == "cosine" and self.max_steps is None:
            raise ValueError("lr_decay = 'cosine' decays to 0 at max_steps: set max_steps")


class DistillLoss(NamedTuple):
    loss: Tensor  # scalar, embed_loss + λ_tok · token_loss + λ_score · score_loss + λ_own · own_score_loss
    embed_loss: Tensor  # mean_B ‖ẽ_SVM − ẽ_RM‖²
    token_loss: Tensor  # mean over B, tokens, channels of (h_SVM − h_RM)²
    score_loss: Tensor  # mean_B E Δᵀ M Δ (0 without a caption metric)
    own_score_loss: Tensor  # mean_B E (Δ·t_b)², t_b the image's own caption (0 without own captions)


class SmoothL1DistillLoss(NamedTuple):
    loss: Tensor  # token_loss + embed_loss + score_loss
    embed_loss: Tensor  # SmoothL1(ẽ_SVM, ẽ_RM), mean
    token_loss: Tensor  # SmoothL1(h_SVM, h_RM), mean
    score_loss: Tensor  # SmoothL1(a_SVM, a_RM), mean


def stitchvm_distill_loss(student_emb: Tensor, student_tok: Tensor, teacher_emb: Tensor, teacher_tok: Tensor,
                          lambda_tok: float = 1.0, caption_metric: Tensor | None = None,
                          lambda_score: float = 0.0, own_text: Tensor | None = None,
                          lambda_own_score: float = 0.0) -> DistillLoss:
    """L = ‖ẽ_SVM − ẽ_RM‖² + λ_tok ‖h_SVM − h_RM‖² (App. D.1) + λ_score E Δᵀ M Δ + λ_own E (Δ·t)², reduced as in
    the module docstring.

    Args:
        student_emb, teacher_emb: (B, E) un-normalised image embeddings.
        student_tok, teacher_tok: (B, T, D) per-token outputs.
        caption_metric: M (E, E) = mean of t tᵀ over normalised caption embeddings (:func:`caption_metric`); None
            gives a score term of 0.
        own_text: (B, E) text embeddings of each image's own caption (normalised here); None gives an own-caption
            score term of 0.
    """
    delta = F.normalize(student_emb, dim=-1) - F.normalize(teacher_emb, dim=-1)  # (B, E)
    embed = delta.pow(2).sum(-1).mean()
    token = (student_tok - teacher_tok).pow(2).mean()
    if caption_metric is None:
        score = embed.new_zeros(())
    else:
        score = delta.shape[-1] * torch.einsum("be,ef,bf->b", delta, caption_metric.to(delta), delta).mean()
    if own_text is None:
        own = embed.new_zeros(())
    else:
        if own_text.shape != delta.shape:
            raise ValueError(f"own_text {tuple(own_text.shape)} must give one caption embedding per image "
                             f"{tuple(delta.shape)}")
        own = delta.shape[-1] * (delta * F.normalize(own_text.to(delta), dim=-1)).sum(-1).pow(2).mean()
    return DistillLoss(embed + lambda_tok * token + lambda_score * score + lambda_own_score * own, embed, token, score,
                       own)


def caption_metric(text_embeds: Tensor) -> Tensor:
    """M = mean_c t_c t_cᵀ (E, E), float32, of the normalised caption embeddings (C, E): Δᵀ M Δ is the mean squared
    change of the score ẽ·t_c over the captions (trace 1)."""
    t = F.normalize(text_embeds.detach().double(), dim=-1)
    return (t.T @ t / t.shape[0]).float()


def smooth_l1_distill_loss(student_emb: Tensor, student_tok: Tensor, student_score: Tensor, teacher_emb: Tensor,
                           teacher_tok: Tensor, teacher_score: Tensor) -> SmoothL1DistillLoss:
    """Aesthetic loss: Smooth-ℓ1 (β = 1, mean) on tokens, normalised embedding and score, all weights 1."""
    token = F.smooth_l1_loss(student_tok, teacher_tok)
    embed = F.smooth_l1_loss(F.normalize(student_emb, dim=-1), F.normalize(teacher_emb, dim=-1))
    score = F.smooth_l1_loss(student_score, teacher_score)
    return SmoothL1DistillLoss(token + embed + score, embed, token, score)


def sample_sigmas(n: int, cfg: DistillConfig, generator: torch.Generator) -> Tensor:
    """(n,) noise levels in (0, 1) from cfg.sigma_sampling, on the CPU (deterministic across devices)."""
    if cfg.sigma_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(cfg.sigma_mean + cfg.sigma_std * torch.randn(n, generator=generator))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """lr multiplier at optimiser step `step` (0-based): (step + 1) / warmup_steps during warm-up, then 1."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """lr multiplier at optimiser step `step` (0-based): linear warm-up, then constant or cosine to 0 at max_steps."""
    return lr_multiplier(step, cfg.warmup_steps, cfg.lr_decay, cfg.max_steps)


def lr_multiplier(step: int, warmup_steps: int, decay: str, max_steps: int | None) -> float:
    """The schedule of lr_factor from its three numbers (shared with stage 3, critics/onpolicy.py)."""
    if step < warmup_steps or decay == "constant":
        return warmup_factor(step, warmup_steps)
    span = max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def stitch_tail_optimizer(model: StitchVM, lr: float, stitch_lr_mult: float,
                          weight_decay: float) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """Make the stitch and the tail trainable; AdamW with the stitch at lr × stitch_lr_mult (paper: 5). Returns
    (trained parameters, optimizer); param group 1 is the tail's (its lr is what gets logged)."""
    stitch_params = model.stitch_parameters()
    tail_params = [p for _, p in model.tail_named_parameters()]
    trained = stitch_params + tail_params
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": stitch_params, "lr": lr * stitch_lr_mult}, {"params": tail_params, "lr": lr}],
        lr=lr, weight_decay=weight_decay, fused=model.head.device.type == "cuda")
    return trained, optimizer


class Batch(NamedTuple):
    """One stage-2 step's clean images, their captions (None: not captioned) and, for rows that carry one, the
    latent the student starts from instead of E(image): ``latents`` (B, C, h, w) read where ``own`` (B,) is True."""

    images: Tensor
    captions: list[str] | None
    latents: Tensor | None = None
    own: Tensor | None = None


def rebatch(data_iter: Iterable, batch_size: int) -> Iterator[Batch]:
    """Re-chunk a stream of image batches into Batches of exactly `batch_size` images; an incomplete last chunk is
    dropped. Items are a Tensor (B, 3, H, W), or a tuple/list whose first item is one and whose second, if a list
    of B strings, gives their captions (None when any item has none); a 4-tuple adds (latents (B, C, h, w), own
    (B,) bool), and then every item must have them (critics.build.MixedStream with the policy's own latents)."""
    buf: list[Tensor] = []
    lat_buf: list[Tensor] = []
    own_buf: list[Tensor] = []
    caps: list[str] | None = []
    held, with_latents = 0, None
    for item in data_iter:
        images = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise TypeError("data_iter must yield image tensors (B, 3, H, W) in [0, 1] (or tuples starting with one)")
        text = item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else None
        if caps is not None and isinstance(text, list) and len(text) == images.shape[0] \
                and all(isinstance(t, str) for t in text):
            caps.extend(text)
        else:
            caps = None
        has = isinstance(item, (tuple, list)) and len(item) == 4
        if with_latents is None:
            with_latents = has
        elif has != with_latents:
            raise ValueError("data_iter mixes items with and without (latents, own): every item needs both or none")
        if has:
            latents, own = item[2], item[3]
            if latents.shape[0] != images.shape[0] or own.shape != (images.shape[0],) or own.dtype != torch.bool:
                raise ValueError(f"latents {tuple(latents.shape)} and own {tuple(own.shape)} ({own.dtype}) must give "
                                 f"one row / one bool per image ({images.shape[0]})")
            lat_buf.append(latents)
            own_buf.append(own)
        buf.append(images)
        held += images.shape[0]
        while held >= batch_size:
            cat = torch.cat(buf)
            lat = torch.cat(lat_buf) if with_latents else None
            own = torch.cat(own_buf) if with_latents else None
            yield Batch(cat[:batch_size], caps[:batch_size] if caps is not None else None,
                        lat[:batch_size] if with_latents else None, own[:batch_size] if with_latents else None)
            buf, held = [cat[batch_size:]], held - batch_size
            if with_latents:
                lat_buf, own_buf = [lat[batch_size:]], [own[batch_size:]]
            if caps is not None:
                caps = caps[batch_size:]


def _check_teacher(teacher_emb: Tensor, reward_emb: Tensor) -> None:
    cos = F.cosine_similarity(teacher_emb.float(), reward_emb.float(), dim=-1).min().item()
    if cos < TEACHER_MIN_COSINE:
        raise ValueError(f"the teacher tower disagrees with reward.image_embed (min cosine {cos:.4f}): the tail's "
                         f"preprocessing differs from the reward's; pass the reward's preprocess to the tail "
                         f"(or set check_teacher=False if intended)")


@dataclass
class DistillState:
    """What stage 2 needs to go on from a checkpoint as if it had not stopped: the trained weights in float32 (a
    critic's own files may be float16), AdamW's moments, the scheduler, the step and the (σ, ε) generator. Written
    next to the critic's files (``files``) and read back from them (``read``); safetensors and JSON only."""

    step: int
    interface: tuple[int, int]  # (i, j) of the critic it trained: the weights fit no other head depth or tail
    weights: dict[str, Tensor]  # "stitch.NAME" and "tail.NAME"
    optimizer: dict
    scheduler: dict
    generator: Tensor  # torch.Generator.get_state()

    @classmethod
    def capture(cls, step: int, model: StitchVM, optimizer, scheduler, generator: torch.Generator) -> "DistillState":
        weights = {f"stitch.{k}": v for k, v in model.stitch.state_dict().items()}
        weights.update({f"tail.{k}": v for k, v in model.tail_named_parameters()})
        return cls(step, (model.i, model.j),
                   {k: (v.float() if v.is_floating_point() else v).detach().cpu().clone() for k, v in weights.items()},
                   optimizer.state_dict(), scheduler.state_dict(), generator.get_state())

    def files(self) -> dict[str, bytes]:
        """{file name: bytes} of the state: STATE_TENSORS (weights, optimizer tensors) and STATE_JSON (the rest)."""
        opt_tensors, opt_meta = optimizer_state_to_tensors(self.optimizer)
        tensors = {**{f"weights/{k}": v for k, v in self.weights.items()},
                   **{f"optimizer/{k}": v for k, v in opt_tensors.items()}}
        meta = {"step": self.step, "interface": list(self.interface), "optimizer": opt_meta,
                "scheduler": scheduler_state_to_json(self.scheduler),
                "generator": base64.b64encode(self.generator.numpy().tobytes()).decode("ascii")}
        return {STATE_TENSORS: safetensors.torch.save(tensors), STATE_JSON: json.dumps(meta).encode()}

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "DistillState":
        """The state a checkpoint in ``directory`` holds; a missing or damaged one is a ValueError that says so."""
        paths = [os.path.join(directory, name) for name in (STATE_TENSORS, STATE_JSON)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            names = ", ".join(map(os.path.basename, missing))
            raise ValueError(f"{directory} holds no stage-2 training state ({names} "
                             f"missing): only a build's checkpoints written during stage 2 have it, a finished "
                             f"critic does not")
        try:
            tensors = safetensors.torch.load_file(paths[0])
            with open(paths[1]) as f:
                meta = json.load(f)
            return cls(int(meta["step"]), tuple(meta["interface"]), _under("weights/", tensors),
                       optimizer_state_from_tensors(_under("optimizer/", tensors), meta["optimizer"]),
                       scheduler_state_from_json(meta["scheduler"]),
                       torch.frombuffer(bytearray(base64.b64decode(meta["generator"])), dtype=torch.uint8))
        except Exception as e:  # a truncated or hand-edited file: name it, do not resume from half a state
            raise ValueError(f"the stage-2 training state in {directory} is damaged ({type(e).__name__}: {e}); "
                             f"resume from an intact checkpoint or start the build again") from e

    def load_weights(self, model: StitchVM) -> None:
        """Copy the float32 weights into the model's stitch and tail (the interface and every name must match)."""
        if tuple(self.interface) != (model.i, model.j):
            raise ValueError(f"the training state is of a critic stitched at (i, j) = {tuple(self.interface)}, this "
                             f"build's is ({model.i}, {model.j}): pin search.pinned={list(self.interface)} to resume "
                             f"it")
        stitch, tail = _under("stitch.", self.weights), _under("tail.", self.weights)
        params = dict(model.tail_named_parameters())
        if set(tail) != set(params):
            raise ValueError(f"the training state's tail weights {sorted(set(tail) ^ set(params))[:4]} do not match "
                             f"the critic being built: resume with the config that wrote the checkpoint")
        model.stitch.load_state_dict(stitch)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tail[name])


def _under(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries whose name starts with ``prefix``, named without it."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def distill(model: StitchVM, teacher_reward: nn.Module, encode_fn: Callable[[Tensor], Tensor], data_iter: Iterable,
            cfg: DistillConfig, callback: Callable[[int, dict], None] | None = None,
            ckpt_meta: dict | None = None,
            save_fn: Callable[[str, StitchVM, dict | None], None] = save_stitchvm,
            caption_metric: Tensor | None = None,
            text_embed_fn: Callable[[list[str]], Tensor] | None = None,
            decode_fn: Callable[[Tensor], Tensor] | None = None,
            resume: DistillState | None = None,
            state_fn: Callable[[dict[str, bytes]], None] | None = None,
            stop_step: int | None = None) -> dict[str, list[float]]:
    """Train the stitch and the tail of `model` to match `teacher_reward` on forward-noised latents.

    Args:
        model: StitchVM at its stage-1 initialisation (trained in place).
        teacher_reward: the reward whose `.vision` tower is the teacher (frozen here: requires_grad is cleared);
            `score_from_image_embed` is used by the "smooth_l1" loss.
        encode_fn: images (B, 3, H, W) in [0, 1] → normalised latents z0 (e.g. FlowPolicy.encode).
        data_iter: re-iterable stream of image batches in [0, 1] (one pass per epoch); items as :func:`rebatch`
            takes them, optionally with captions and with the latents some rows start from.
        callback: called as callback(step, stats) every cfg.log_every steps with the latest metrics.
        ckpt_meta: identity fields passed to save_stitchvm.
        save_fn: writes the checkpoints, save_fn(ckpt_dir, model, ckpt_meta); a critic with another head (e.g.
            critics.vae_stitch) passes its own saver.
        caption_metric: M (E, E) of the caption-score term (:func:`caption_metric`); required when
            cfg.lambda_score > 0.
        text_embed_fn: captions → (B, E) text embeddings (the reward's ``text_embed``) for the own-caption score
            term; required when cfg.lambda_own_score > 0, with captioned data.
        decode_fn: normalised latents → images (B, 3, H, W) in [0, 1] (e.g. FlowPolicy.decode); the teacher scores
            decode_fn(z0) when cfg.teacher_input is "decoded" (required then).
        resume: a checkpoint's DistillState: the weights, optimizer, scheduler, generator and step go on from it
            (the data stream restarts: pass a differently seeded one for fresh batches).
        state_fn: called with the DistillState's files right before each checkpoint's save_fn (critics.build writes
            them into the checkpoint, so that it can be resumed).
        stop_step: stop after this step too: where a resumed run's epochs would have ended (its restarted data
            stream cannot tell; critics.build computes it), without touching max_steps, which shapes the schedule.
    Returns:
        {"distill/loss": [...], "distill/embed_loss": [...], "distill/token_loss": [...], "distill/score_loss",
         "distill/own_score_loss",
         "distill/lr": [...], "distill/grad_norm": [...], "distill/sigma_mean": [...]}, one entry per step.
    """
    # ---- setup ----------------------------------------------------------------------------------------------
    if cfg.lambda_score > 0 and caption_metric is None:
        raise ValueError("lambda_score > 0 needs the caption metric M: pass caption_metric (critics.build makes it "
                         "from score_captions)")
    if cfg.lambda_own_score > 0 and text_embed_fn is None:
        raise ValueError("lambda_own_score > 0 scores each image against its own caption: pass text_embed_fn (the "
                         "reward's text_embed; critics.build does)")
    if cfg.teacher_input == "decoded" and decode_fn is None:
        raise ValueError("teacher_input 'decoded' scores D(z0): pass decode_fn (the policy's decode; critics.build "
                         "does)")
    device = model.head.device
    metric = caption_metric.to(device) if caption_metric is not None and cfg.lambda_score > 0 else None
    teacher_reward.requires_grad_(False)
    teacher = make_tail(teacher_reward.vision, model.tail.preprocess)  # the original tower, not the trained copy
    teacher.eval()
    trained, optimizer = stitch_tail_optimizer(model, cfg.lr, cfg.stitch_lr_mult, cfg.weight_decay)
    head_ids = {id(p) for p in model.head.parameters()}
    if head_ids & {id(p) for p in trained}:
        raise RuntimeError("head parameters found among the trained ones")
    if {id(p) for p in teacher_reward.parameters()} & {id(p) for p in trained}:
        raise ValueError("the StitchVM tail shares parameters with the teacher reward: build it from a copy "
                         "(build_stitchvm deep-copies reward.vision)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.micro_batch_size or cfg.batch_size
    stats: dict[str, list[float]] = {k: [] for k in (
        "distill/loss", "distill/embed_loss", "distill/token_loss", "distill/lr", "distill/grad_norm",
        "distill/sigma_mean")}
    stats["distill/score_loss"] = []
    stats["distill/own_score_loss"] = []
    model.train()
    step = 0
    if resume is not None:
        if cfg.max_steps is None and stop_step is None:
            raise ValueError("a resumed run cannot tell which epoch it stopped in: give it max_steps or stop_step")
        resume.load_weights(model)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        generator.set_state(resume.generator)
        step = resume.step
    prompted = getattr(model, "head_text", None) is not None

    student, encode_teacher = model.features_from_cond, teacher.encode
    if cfg.compile != "none":
        student = torch.compile(student, mode=cfg.compile)
        encode_teacher = torch.compile(teacher.encode, mode=cfg.compile)

    def checkpoint() -> None:  # the critic's files, and the state that resumes from them
        if state_fn is not None:
            state_fn(DistillState.capture(step, model, optimizer, scheduler, generator).files())
        save_fn(cfg.ckpt_dir, model, ckpt_meta)

    last = min(n for n in (cfg.max_steps, stop_step, math.inf) if n is not None)
    bar = tqdm(total=None if last == math.inf else last, initial=step, disable=not cfg.progress,
               desc="stitchvm distill")
    for _epoch in range(cfg.epochs):
        epoch_start = step
        for images, captions, given, own in rebatch(data_iter, cfg.batch_size):
            if step >= last:
                break
            own_text = None
            if cfg.lambda_own_score > 0:  # the own captions' embeddings, before the head's caption dropout
                if captions is None:
                    raise ValueError("lambda_own_score > 0 needs each training image's caption: the data must yield "
                                     "(images, captions) (policy samples carry their prompts)")
                with torch.no_grad():
                    own_text = text_embed_fn(list(captions)).to(device)
                if own_text.shape[0] != len(captions):
                    raise ValueError(f"text_embed_fn gave {own_text.shape[0]} embeddings for {len(captions)} captions")
            if prompted:  # the head sees each image's caption, a share of them dropped to ""
                if captions is None:
                    raise ValueError("a prompt-conditioned head needs each training image's caption: the data must "
                                     "yield (images, captions) (dataset items {'image', 'caption'}; policy samples "
                                     "carry their prompts)")
                keep = torch.rand(len(captions), generator=generator) >= cfg.caption_dropout
                captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
            step_stats: dict[str, float] = {}
            # noise for the whole step, drawn before splitting into micro-batches, so that gradient accumulation
            # sees exactly the same (σ, ε) as one big batch
            sigma_all = sample_sigmas(cfg.batch_size, cfg, generator)  # (B,)
            eps_all = torch.randn(cfg.batch_size, model.latent_channels, model.latent_size, model.latent_size,
                                  generator=generator)  # (B, C, h, w)
            for s in range(0, cfg.batch_size, micro):
                x0 = images[s:s + micro].to(device)
                w = x0.shape[0] / cfg.batch_size  # micro-batch share of the step's mean loss
                # 1. the student's clean latent z0 and the teacher's targets, on x0 or on D(z0)
                with torch.no_grad():
                    z0 = encode_fn(x0)  # (b, C, h, w)
                if z0.shape[1:] != eps_all.shape[1:]:
                    raise ValueError(f"encode_fn gives latents {tuple(z0.shape[1:])}; the critic was built for "
                                     f"{tuple(eps_all.shape[1:])}")
                if own is not None:  # rows that carry the latent the critic is used on start from it, not E(x0)
                    if given.shape[1:] != z0.shape[1:]:
                        raise ValueError(f"the data carries latents {tuple(given.shape[1:])}; the critic was built "
                                         f"for {tuple(z0.shape[1:])}")
                    rows = own[s:s + micro].to(device).view(-1, 1, 1, 1)
                    z0 = torch.where(rows, given[s:s + micro].to(device, z0.dtype), z0)
                with torch.no_grad():
                    if cfg.check_teacher and step == 0 and s == 0:
                        _check_teacher(teacher.encode(x0).embed, teacher_reward.image_embed(x0))
                    seen = x0 if cfg.teacher_input == "image" else decode_fn(z0).to(x0.dtype)
                    if seen.shape != x0.shape:
                        raise ValueError(f"decode_fn gives images {tuple(seen.shape)} for a batch of {tuple(x0.shape)}")
                    t_out = encode_teacher(seen)
                # 2. student input: forward-noised latent z_t = (1 − σ) z0 + σ ε
                sigma = sigma_all[s:s + micro].to(device, z0.dtype)
                eps = eps_all[s:s + micro].to(device, z0.dtype)
                z_t = (1 - sigma.view(-1, 1, 1, 1)) * z0 + sigma.view(-1, 1, 1, 1) * eps
                s_out = student(z_t, sigma, model.head_cond(captions[s:s + micro], z_t.shape[0]) if prompted else None)
                # 3. loss (App. D.1)
                if cfg.loss == "embed_token":
                    out = stitchvm_distill_loss(s_out.embed, s_out.tokens, t_out.embed, t_out.tokens, cfg.lambda_tok,
                                                metric, cfg.lambda_score,
                                                own_text[s:s + micro] if own_text is not None else None,
                                                cfg.lambda_own_score)
                else:
                    with torch.no_grad():
                        t_score = teacher_reward.score_from_image_embed(t_out.embed)
                    s_score = teacher_reward.score_from_image_embed(s_out.embed)
                    out = smooth_l1_distill_loss(s_out.embed, s_out.tokens, s_score, t_out.embed, t_out.tokens,
                                                 t_score)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"non-finite distillation loss at step {step}: {out}")
                (out.loss * w).backward()
                for name, value in out._asdict().items():
                    step_stats[name] = step_stats.get(name, 0.0) + w * value.item()
            step_stats["sigma_mean"] = sigma_all.mean().item()
            # 4. optimise
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, max_norm).item()
            step_stats["lr"] = scheduler.get_last_lr()[1]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # 5. log / checkpoint
            step_stats["grad_norm"] = grad_norm
            for name, value in step_stats.items():
                stats[f"distill/{name}"].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{step_stats['loss']:.4g}")
            if callback is not None and step % cfg.log_every == 0:
                callback(step, {k: v[-1] for k, v in stats.items()})
            if cfg.ckpt_dir is not None and cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint()
        if step >= last:
            break
        if _epoch > 0 and step == epoch_start > 0:  # a generator is spent after one pass: the run would end early
            raise ValueError(f"data_iter yielded no batch in epoch {_epoch + 1} of {cfg.epochs}: pass a re-iterable "
                             f"dataset (a list, a DataLoader), not a one-shot iterator")
    bar.close()
    model.eval()
    if step == 0:
        raise ValueError(f"no optimiser step taken: data_iter yielded fewer than batch_size = {cfg.batch_size} images")
    if cfg.ckpt_dir is not None:
        checkpoint()  # the final weights, with their own state (never an older checkpoint's)
    return stats
