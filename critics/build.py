"""Build a stitched critic end to end from a YAML: probe → interface search → stitch init → distillation → save.

    python -m critics.build --config configs/critic/build_shapes.yaml [key=value ...]
    python -m critics.build --config configs/critic/build_shapes.yaml kind=vae_stitch \
        output_dir=shapes/weights/vae_stitch
    stitchvm-build-critic --config configs/critic/build_sd35m_clip.yaml policy.path=/models/sd3.5-medium ...

Paper: "Stitched Value Model for Diffusion Alignment" (arXiv 2605.19804), §3 and App. C.1 / D.1. Stages:

  1. load     instantiate the policy (FlowPolicy), the reward (CLIP-family: `.vision`, `.preprocess_cfg`) and
              the training images (`data`, any `_component_` giving a dataset of images in [0, 1])
  2. probe    N_probe clean images x0 (the first `probe.n` items of `data`), latents z0 = E(x0) and noise
              levels t ~ `probe.sigma_law` (paper: 200 images, t ~ U[0, 1])
  3. search   cache u^{≤i}(z_t) and r^{≤j−1}(x0), fit Eq. 7 per (i, j) in closed form (critics/interface.py),
              print the fit-error grid, save it as interface.png + interface.json, select the minimum or the
              pinned pair. kind=vae_stitch: the head is the identity on z_t and only j is searched.
  4. init     F_ψ ← (W*, b*), G_ψ ≡ 0, tail = a trainable copy of the reward tower from block j (Eq. 57)
  5. distill  stage 2 (critics/distill.py): progress bar, a log line every `distill.log_every` steps, checkpoints
              (the whole output directory, atomically) every `distill.ckpt_every` steps
  5b. onpolicy stage 3 (ours, critics/onpolicy.py; `onpolicy.enabled`): value regression on the policy's own
              SDE trajectories, same checkpointing. With `init_from: DIR` stages 2-5 are skipped and stage 3
              starts from the critic saved in DIR (its interface.json / heatmap are carried over).
  6. save     output_dir/: stitch.safetensors, tail.safetensors (in `store_dtype`), stitchvm.json (vae_stitch.json),
              interface.json, interface.png (or at `heatmap`), build.json (resolved config, stage times, loss curve),
              manifest.json (sha256 of every file; the loaders verify it)

Exit status: 0 done; 2 a configuration or pairing error, printed as one message; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from critics.distill import STATE_JSON, STATE_TENSORS, DistillConfig, DistillState, caption_metric, distill
from critics.onpolicy import OnPolicyConfig, onpolicy_finetune
from critics.interface import InterfaceResult, save_heatmap, search, validate_interface
from critics.load import reward_preprocess
from critics.stitchvm import (CLASS_TOKEN_KEY, STITCH_FILE, TAIL_FILE, DiTHead, HeadText, StitchVM, build_stitchvm,
                              save_stitchvm)
from critics.tails import make_tail
from critics.vae_stitch import LATENT_TAP, build_vae_stitch, latent_head, save_vae_stitch, search_latent
from rl.checkpoint import atomic_write_bytes, write_dir_atomically
from rl.config import (ConfigError, apply_overrides, check, config_help, from_dict, instantiate, load_yaml, option,
                       to_dict)

DEFAULT_CONFIG = "configs/critic/build_shapes.yaml"
KINDS = ("stitchvm", "vae_stitch")
INTERFACE_JSON = "interface.json"
INTERFACE_PNG = "interface.png"
BUILD_JSON = "build.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeConfig:
    n: int = option(200, help="N_probe: clean probe images, the first n items of `data` (paper: 200).")
    sigma_law: Literal["uniform", "logit_normal"] = option(
        "uniform", help="law of the probe noise level t: U[0, 1] (paper) or sigmoid(N(0, 1)).")
    batch_size: int = option(32, help="probe images per forward pass while caching features.")

    def __post_init__(self) -> None:
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class SearchConfig:
    i_values: list[int] | None = option(
        None, help="DiT blocks i to fit (default: every block 1..num_layers). Unused for kind=vae_stitch.")
    j_values: list[int] | None = option(None, help="reward blocks j to fit, each <= 4 (default: 1..min(4, L)).")
    pinned: tuple[int, int] | None = option(
        None, help="[i, j] to use instead of the minimum (it is fitted and shown too); [0, j] for vae_stitch.")
    criterion: Literal["rel_mse", "mse"] = option(
        "rel_mse", help="selection criterion: MSE / Var(target) (default; targets of different j differ in "
                        "scale) or the absolute MSE of Eq. 7.")


@dataclass
class PolicySampleConfig:
    n: int = option(0, help="images the policy generates for stage 2, next to the data (0: the data only). The "
                            "critic values the policy's own latents, which are off the data's support; the teacher "
                            "scores their decoded images.")
    fraction: float = option(0.5, help="share of every stage-2 batch drawn (with replacement) from them.")
    prompts: dict[str, Any] | None = option(
        None, help="node giving their prompts (a list of str), e.g. {_component_: shapes.data.prompts, split: train, "
                   "n: 65536, seed: 5}; keep the benchmark's prompts out.")
    num_steps: int = option(20, help="sampler steps.")
    guidance_scales: list[float] = option(default_factory=lambda: [1.0, 4.5],
                                          help="CFG scales, cycled over generation batches (RL: 1, evaluation: 4.5).")
    etas: list[float] = option(default_factory=lambda: [0.0, 0.7],
                               help="sampler noise levels, cycled over batches (0: ODE; 0.7: the RL / MC SDE).")
    batch_size: int = option(256, help="images per generation batch.")
    seed: int = option(0, help="seed of the initial noise and of the draws into batches.")
    student_latents: Literal["encoded", "own"] = option(
        "encoded", help="what the student's z_t is built from for these samples: 'encoded', E(D(z0)) of the decoded "
                        "image, as for the data; 'own', the policy's own final latent z0, the latent the critic is "
                        "used on (on Shapes E(D(z0)) differs from z0 by 14-16 % of its norm). The teacher scores "
                        "D(z0) either way.")

    def __post_init__(self) -> None:
        check(self.n >= 0, "n", f"must be >= 0, got {self.n}")
        check(0 < self.fraction < 1, "fraction", f"must be in (0, 1), got {self.fraction}")
        check(self.num_steps >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(len(self.guidance_scales) >= 1 and all(g >= 0 for g in self.guidance_scales), "guidance_scales",
              f"must be a non-empty list of CFG weights >= 0, got {self.guidance_scales}")
        check(len(self.etas) >= 1 and all(e >= 0 for e in self.etas), "etas",
              f"must be a non-empty list of noise levels >= 0, got {self.etas}")
        check(self.n == 0 or self.prompts is not None, "prompts",
              "policy_samples.n > 0 needs the prompts to generate from, e.g. {_component_: shapes.data.prompts, "
              "split: train, n: 65536, seed: 5}")


@dataclass
class BuildConfig:
    policy: dict[str, Any] = option(help="FlowPolicy node, e.g. {_component_: shapes.models.load_shapes_policy}.")
    reward: dict[str, Any] = option(help="reward node with `.vision` and `.preprocess_cfg` (CLIPScore, HPSv2...).")
    data: dict[str, Any] = option(
        help="node giving the clean training images: a dataset whose items are (3, H, W) tensors in [0, 1], "
             "{'image': ...} dicts or (image, ...) tuples, at the policy's resolution.")
    output_dir: str = option(help="where the critic is written (relative paths: from the current directory).")
    kind: Literal["stitchvm", "vae_stitch"] = option(
        "stitchvm", help="stitchvm: DiT head u^{<=i}; vae_stitch: identity head on z_t (paper's baseline).")
    score: Literal["prompt", "image"] = option(
        "prompt", help="prompt: V = reward.score_from_embeds(e, text); image: V = reward.score_from_image_embed(e).")
    probe: ProbeConfig = option(default_factory=ProbeConfig, help="stage-1 probe set.")
    search: SearchConfig = option(default_factory=SearchConfig, help="stage-1 interface search.")
    distill: DistillConfig = option(
        default_factory=DistillConfig,
        help="stage 2 (critics.distill.DistillConfig fields); ckpt_dir null = checkpoint into output_dir.")
    policy_samples: PolicySampleConfig = option(
        default_factory=PolicySampleConfig, help="stage-2 images generated by the policy itself (off by default).")
    score_captions: dict[str, Any] | None = option(
        None, help="node giving the captions (a list of str) of distill.lambda_score's caption-score term, "
                   "M = mean t t^T of their normalised text embeddings, e.g. {_component_: shapes.data.prompts, "
                   "split: train, n: 4096, seed: 11}; needed when distill.lambda_score > 0.")
    onpolicy: OnPolicyConfig = option(
        default_factory=OnPolicyConfig,
        help="stage 3 (critics.onpolicy.OnPolicyConfig fields): on-policy value regression; off by default.")
    init_from: str | None = option(
        None, help="a saved critic directory of the same kind: skip stages 2-5 and start stage 3 from it.")
    resume: bool = option(
        False, help="go on with stage 2 from the checkpoint in distill.ckpt_dir (default output_dir) that an "
                    "interrupted build wrote: its weights, optimizer, schedule and step. The config must be the one "
                    "that wrote it (workers, device, logging and checkpoint cadence may differ); the batches after "
                    "the step are a fresh draw.")
    loader_batch_size: int = option(64, help="images per DataLoader batch (distill re-chunks to its batch_size).")
    num_workers: int = option(0, help="DataLoader worker processes producing training images.")
    bottleneck_ratio: int = option(8, help="G_psi hidden width = D_tail // ratio (paper 1:8).")
    stitch_blocks: int = option(
        0, help="ours (0: the paper's stitch): transformer blocks of the tail's width after G_psi, identity at "
                "initialisation (critics.stitchvm.Stitch); capacity between the frozen head and the tail.")
    head_dtype: Literal["float32", "bfloat16"] = option(
        "float32", help="dtype of the frozen policy transformer (the head); the stitch and tail train in float32.")
    store_dtype: Literal["float32", "float16"] = option(
        "float32", help="dtype of the saved stitch and tail tensors (they train in float32; the loader casts back).")
    head_conditioning: Literal["null_text", "prompt"] = option(
        "null_text", help="text the DiT head runs on: null_text (\"\", the paper) or prompt (each image's caption, the policy "
                     "samples' prompts; distill.caption_dropout of them dropped to \"\"): V then sees the prompt the "
                     "policy denoises towards. Needs captioned data.")
    heatmap: str | None = option(
        None, help="where the stage-1 heatmap PNG goes (default: output_dir/interface.png).")
    device: str = option("cpu", help="torch device, e.g. cpu or cuda.")
    seed: int = option(0, help="seed of the probe noise and of data shuffling (distill.seed seeds stage 2).")
    meta: dict[str, Any] = option(
        default_factory=dict, help="identity fields stored in the critic's JSON: backbone, reward, image_size.")

    def __post_init__(self) -> None:
        check(self.loader_batch_size >= 1, "loader_batch_size", f"must be >= 1, got {self.loader_batch_size}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.bottleneck_ratio >= 1, "bottleneck_ratio", f"must be >= 1, got {self.bottleneck_ratio}")
        check(self.stitch_blocks >= 0, "stitch_blocks", f"must be >= 0, got {self.stitch_blocks}")
        check(not Path(self.output_dir).is_file(), "output_dir",
              f"{self.output_dir} is a file; the critic is a directory: give a directory path")
        if self.heatmap is not None:
            parent = Path(self.heatmap).resolve().parent
            check(not Path(self.heatmap).is_dir(), "heatmap", f"{self.heatmap} is a directory: give a PNG file path")
            check(not parent.exists() or parent.is_dir(), "heatmap", f"{parent} is not a directory")
        check(not (self.resume and self.init_from is not None), "resume",
              "goes on with stage 2, which init_from skips: set one of them")
        if self.init_from is not None:
            check(self.onpolicy.enabled, "init_from", "starts stage 3 from a saved critic: set onpolicy.enabled=true")
            check(Path(self.init_from).resolve() != Path(self.output_dir).resolve(), "init_from",
                  "must differ from output_dir (the source critic is never overwritten)")
        if self.distill.lambda_score > 0:
            check(self.score == "prompt", "distill.lambda_score",
                  "the caption-score term is for prompt-dependent rewards (score: prompt); set it to 0")
            check(self.score_captions is not None, "score_captions",
                  "distill.lambda_score > 0 weights the embedding error by caption directions: give the captions, "
                  "e.g. score_captions={_component_: shapes.data.prompts, split: train, n: 4096, seed: 11}")
        if self.distill.lambda_own_score > 0:
            check(self.score == "prompt", "distill.lambda_own_score",
                  "the own-caption score term is for prompt-dependent rewards (score: prompt); set it to 0")
        if self.kind == "vae_stitch":
            check(self.head_conditioning == "null_text", "head_conditioning",
                  "kind=vae_stitch has no DiT head to condition: leave it null_text")
            # the baseline is compared with StitchVM on the reward both were distilled from; its loader has no
            # critic.tower to check another value target against
            check(self.onpolicy.target is None, "onpolicy.target",
                  "kind=vae_stitch is the baseline of the tower's own reward: drop onpolicy.target")
        if self.kind == "vae_stitch" and self.search.pinned is not None:
            check(self.search.pinned[0] == LATENT_TAP, "search.pinned",
                  f"kind=vae_stitch has no DiT block: pin [0, j], got {list(self.search.pinned)}")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> BuildConfig:
    """YAML + `key=value` overrides → BuildConfig; every mistake is a ConfigError naming the key."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        return from_dict(BuildConfig, raw)
    except ValueError as e:  # DistillConfig validates with ValueError in its __post_init__
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"distill: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
class ImageFolder(Dataset):
    """Every image under `root` (recursive, sorted by path), shortest side resized to `resolution` (bicubic) and
    centre-cropped: items are float (3, resolution, resolution) in [0, 1].

    Args:
        root: directory of .png / .jpg / .jpeg / .webp / .bmp files.
        resolution: side of the square output (the policy's image size, e.g. 512 for SD3.5-M at 512²).
        limit: keep only the first `limit` files (None: all).
    """

    def __init__(self, root: str | os.PathLike, resolution: int, limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if limit is not None:
            self.files = self.files[:limit]
        if not self.files:
            raise FileNotFoundError(f"ImageFolder: no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        import numpy as np
        from PIL import Image

        with Image.open(self.files[index]) as im:
            im = im.convert("RGB")
            scale = self.resolution / min(im.size)
            w, h = max(self.resolution, round(im.width * scale)), max(self.resolution, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
            im = im.crop((left, top, left + self.resolution, top + self.resolution))
            arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, R, R)


def image_of(item: Any) -> Tensor:
    """The (3, H, W) image of a dataset item: a tensor, {'image': tensor} or (tensor, ...)."""
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"data items are dicts without an 'image' key (keys: {sorted(item)})")
        item = item["image"]
    elif isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, Tensor) or item.dim() != 3 or item.shape[0] != 3:
        raise ValueError(f"data items must be (3, H, W) image tensors in [0, 1] (or dicts / tuples holding one); "
                         f"got {type(item).__name__} {tuple(item.shape) if isinstance(item, Tensor) else ''}")
    return item


def collate_images(items: list[Any]) -> Tensor:
    return torch.stack([image_of(it) for it in items])  # (B, 3, H, W)


def caption_of(item: Any) -> str:
    """The caption of a dataset item: {'caption': str} or (image, str)."""
    text = item.get("caption") if isinstance(item, dict) else (
        item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else None)
    if not isinstance(text, str):
        raise ValueError("head_conditioning 'prompt' needs a caption for every training image: data items must be "
                         "{'image': ..., 'caption': str} dicts or (image, caption) tuples (shapes.data.ShapesDataset "
                         "gives them); use head_conditioning 'null_text' for images without captions")
    return text


def collate_captioned(items: list[Any]) -> tuple[Tensor, list[str]]:
    return collate_images(items), [caption_of(it) for it in items]


class ImageStream:
    """Re-iterable stream of image batches (B, 3, H, W) over a map-style dataset, reshuffled every pass; with
    ``captions``, of (images, captions) pairs."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, shuffle: bool = True,
                 captions: bool = False):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.shuffle, self.captions = num_workers, shuffle, captions
        self.passes = 0

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, list[str]]]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator,
                            num_workers=self.num_workers,
                            collate_fn=collate_captioned if self.captions else collate_images)
        yield from loader


def prompt_list(node: dict, path: str) -> list[str]:
    """Instantiate a config node that must give prompts or captions: a non-empty list of strings."""
    prompts = instantiate(node, _path=path)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{path} must give a non-empty list of strings, got {type(prompts).__name__}")
    return prompts


class MixedStream:
    """Re-iterable stream of the data's batches, each extended with policy samples so that they make up
    ``fraction`` of it (drawn with replacement from ``bank``, (N, 3, H, W) uint8), then shuffled. When the data
    yields (images, captions), ``bank_prompts`` (the N samples' prompts) extend the captions the same way. With
    ``bank_latents`` (N, C, h, w), the samples' own latents, items are (images, captions, latents, own): the
    student starts a sample's z_t from its latent (``own`` True) and a data row's from E(image) (critics.distill)."""

    def __init__(self, stream: Iterable, bank: Tensor, fraction: float, seed: int,
                 bank_prompts: list[str] | None = None, bank_latents: Tensor | None = None):
        if bank.dtype != torch.uint8 or bank.dim() != 4 or bank.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty (N, 3, H, W) uint8 tensor, got {bank.dtype} "
                             f"{tuple(bank.shape)}")
        if bank_prompts is not None and len(bank_prompts) != bank.shape[0]:
            raise ValueError(f"{len(bank_prompts)} prompts for {bank.shape[0]} policy samples")
        if bank_latents is not None and (bank_latents.dim() != 4 or bank_latents.shape[0] != bank.shape[0]):
            raise ValueError(f"bank_latents must be (N, C, h, w) with one row per policy sample ({bank.shape[0]}), "
                             f"got {tuple(bank_latents.shape)}")
        self.stream, self.bank, self.fraction, self.seed = stream, bank, fraction, seed
        self.bank_prompts, self.bank_latents = bank_prompts, bank_latents
        self.passes = 0

    def __iter__(self) -> Iterator[Tensor | tuple]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        for item in self.stream:
            images, captions = item if isinstance(item, (tuple, list)) else (item, None)
            k = round(len(images) * self.fraction / (1 - self.fraction))
            rows = torch.randint(len(self.bank), (k,), generator=generator)
            extra = self.bank[rows].float().div_(255.0)
            if extra.shape[1:] != images.shape[1:]:
                raise ValueError(f"policy samples are {tuple(extra.shape[1:])}, the data's images "
                                 f"{tuple(images.shape[1:])}: generate at the data's resolution")
            both = torch.cat([images, extra])
            order = torch.randperm(len(both), generator=generator)
            texts = None
            if captions is not None:
                if self.bank_prompts is None:
                    raise ValueError("the data yields captions but the policy samples have no prompts: pass "
                                     "bank_prompts")
                texts = list(captions) + [self.bank_prompts[r] for r in rows.tolist()]
                texts = [texts[o] for o in order.tolist()]
            if self.bank_latents is not None:
                own_latents = self.bank_latents[rows].float()
                latents = torch.cat([own_latents.new_zeros((len(images), *own_latents.shape[1:])), own_latents])
                own = torch.cat([torch.zeros(len(images), dtype=torch.bool), torch.ones(k, dtype=torch.bool)])
                yield both[order], texts, latents[order], own[order]
            elif texts is None:
                yield both[order]
            else:
                yield both[order], texts


@torch.no_grad()
def generate_samples(policy, prompts: list[str], cfg: PolicySampleConfig) -> tuple[Tensor, Tensor]:
    """``cfg.n`` policy samples on the CPU: decoded images (n, 3, H, W) uint8 and the final latents z0 they decode
    from (n, C, h, w) float16. Prompts cycled, and per batch the next (CFG scale, eta) of the cycles, so every
    setting gets its share."""
    generator = torch.Generator(policy.device).manual_seed(cfg.seed)
    every = sample_prompts(prompts, cfg.n)
    out, latents = [], []
    for b, start in enumerate(range(0, cfg.n, cfg.batch_size)):
        rows = every[start:start + cfg.batch_size]
        guidance = cfg.guidance_scales[b % len(cfg.guidance_scales)]
        eta = cfg.etas[(b // len(cfg.guidance_scales)) % len(cfg.etas)]
        traj = policy.sample(rows, num_steps=cfg.num_steps, guidance_scale=guidance, eta=eta, generator=generator,
                             keep_latents=False)
        images = policy.decode(traj.z_tau)  # (b, 3, H, W) in [0, 1]
        out.append(images.mul(255).round().to(torch.uint8).cpu())
        latents.append(traj.z_tau.to(torch.float16).cpu())
    return torch.cat(out), torch.cat(latents)


def sample_prompts(prompts: list[str], n: int) -> list[str]:
    """The prompts of generate_samples' n samples, in order: the list cycled."""
    return [prompts[k % len(prompts)] for k in range(n)]


def first_items(dataset: Dataset, n: int) -> list[Any]:
    """The first n items of `dataset` (the probes: rendered once, for their images and, if needed, captions)."""
    if len(dataset) < n:
        raise ValueError(f"probe.n = {n} but the data has only {len(dataset)} images")
    return [dataset[k] for k in range(n)]


@torch.no_grad()
def encode_images(policy: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """z0 = E(x0) for (N, 3, H, W) images, on the CPU in float32: (N, C, h, w)."""
    return torch.cat([policy.encode(images[s:s + batch_size].to(policy.device)).float().cpu()
                      for s in range(0, images.shape[0], batch_size)])


def probe_sigmas(n: int, law: str, generator: torch.Generator) -> Tensor:
    """(n,) probe noise levels t on the CPU (float64, as critics.interface draws them)."""
    if law == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def format_grid(result: InterfaceResult) -> str:
    """The fit-error grid as text: rows i, columns j, the selected cell starred."""
    head = "i \\ j " + "".join(f"{j:>11d}" for j in result.j_values)
    identity = ", 0 = identity head" if result.i_values == [LATENT_TAP] else ""
    lines = [f"stage-1 fit {result.criterion} (rows: DiT block i{identity}; columns: reward block j; * = selected)",
             head]
    for a, i in enumerate(result.i_values):
        cells = "".join(f"{float(result.grid[a, c]):>10.4g}{'*' if (i, j) == tuple(result.best) else ' '}"
                        for c, j in enumerate(result.j_values))
        lines.append(f"{i:>5d} {cells}")
    return "\n".join(lines)


def interface_record(result: InterfaceResult, cfg: BuildConfig) -> dict:
    return {"kind": cfg.kind, "criterion": result.criterion, "i_values": result.i_values, "j_values": result.j_values,
            "best": list(result.best), "pinned": list(cfg.search.pinned) if cfg.search.pinned else None,
            "mse": result.mse.tolist(), "rel_mse": result.rel_mse.tolist(),
            "probe": {"n": cfg.probe.n, "sigma_law": cfg.probe.sigma_law, "seed": cfg.seed}}


def heatmap_png(result: InterfaceResult) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, INTERFACE_PNG)
        save_heatmap(result, path)
        return Path(path).read_bytes()


def save_critic_dir(path_dir: str | os.PathLike, model: StitchVM, meta: dict | None,
                    saver: Callable[[str, StitchVM, dict | None], None], extras: dict[str, bytes],
                    store_dtype: torch.dtype = torch.float32) -> None:
    """The critic's files plus `extras` (name → bytes) as one directory, swapped into place atomically.

    Floating-point tensors are stored in `store_dtype` (the loaders copy them into the float32 modules).
    """

    def write(tmp: str) -> None:
        inner = os.path.join(tmp, "weights")
        saver(inner, model, meta)
        for name in os.listdir(inner):
            os.replace(os.path.join(inner, name), os.path.join(tmp, name))
        os.rmdir(inner)
        if store_dtype != torch.float32:
            for name in (STITCH_FILE, TAIL_FILE):
                path = os.path.join(tmp, name)
                tensors = load_file(path)
                # the class token stays float32: the loader makes it a Parameter as stored
                save_file({k: v.to(store_dtype) if v.is_floating_point() and k != CLASS_TOKEN_KEY else v
                           for k, v in tensors.items()}, path)
        for name, data in extras.items():
            Path(tmp, name).write_bytes(data)

    write_dir_atomically(path_dir, write, manifest=True)


def say(stage: str, message: str) -> None:
    print(f"[build:{stage}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    model: StitchVM
    interface: InterfaceResult
    stats: dict[str, list[float]]
    output_dir: Path
    times: dict[str, float] = field(default_factory=dict)


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available; use device=cpu")
    return device


def _check_search(cfg: BuildConfig, num_dit_blocks: int, num_tail_blocks: int) -> tuple[list[int], list[int] | None]:
    """Resolve and validate the (i, j) candidates before any feature is computed; ConfigError on a bad pair."""
    j_values = cfg.search.j_values
    if cfg.kind == "vae_stitch":
        pairs = [(1, j) for j in (j_values or [])]  # i is irrelevant: validate j with a dummy i = 1
        if cfg.search.pinned is not None:
            pairs.append((1, cfg.search.pinned[1]))
        i_values = [LATENT_TAP]
    else:
        i_values = cfg.search.i_values or list(range(1, num_dit_blocks + 1))
        pairs = [(i, j) for i in i_values for j in (j_values or [1])]
        if cfg.search.pinned is not None:
            pairs.append(tuple(cfg.search.pinned))
    for i, j in pairs:
        try:
            validate_interface(i, j, num_dit_blocks, num_tail_blocks)
        except ValueError as e:
            raise ConfigError(f"search: {e}") from None
    return i_values, j_values


def build(cfg: BuildConfig) -> BuildResult:
    """Run stages 1-6 (module docstring). Raises ConfigError / ValueError / FileNotFoundError with one message."""
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    device = _check_device(cfg.device)
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)

    # 1. load ---------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    say("load", f"policy {cfg.policy.get('_component_')}, reward {cfg.reward.get('_component_')}, "
                f"data {cfg.data.get('_component_')} on {device}")
    policy = instantiate(cfg.policy, _path="policy").to(device)
    reward = instantiate(cfg.reward, _path="reward").to(device)
    dataset = instantiate(cfg.data, _path="data")
    reward.requires_grad_(False)
    policy.transformer.to(DTYPES[cfg.head_dtype])
    preprocess = reward_preprocess(reward)
    teacher = make_tail(reward.vision, preprocess)
    num_layers = len(policy.transformer.transformer_blocks)
    i_values, j_values = _check_search(cfg, num_layers, teacher.num_blocks)
    say("load", f"policy: {num_layers} DiT blocks, latents ({policy.latent_channels}, {policy.latent_size}, "
                f"{policy.latent_size}); reward tower: {teacher.num_blocks} blocks of width {teacher.width}, patch "
                f"grid {teacher.grid}; data: {len(dataset)} images")
    times["load_s"] = time.perf_counter() - t

    record: dict[str, Any] = {"config": to_dict(cfg), "times": times}
    state = _resume_state(cfg) if cfg.resume else None  # before any work: a wrong resume fails at once
    extras: dict[str, bytes] = {}
    stats: dict[str, list[float]] = {}
    result: InterfaceResult | None = None
    saver = save_stitchvm if cfg.kind == "stitchvm" else save_vae_stitch

    def save_fn(path: str, critic: StitchVM, ckpt_meta: dict | None) -> None:
        extras[BUILD_JSON] = (json.dumps(record, indent=2) + "\n").encode()
        save_critic_dir(path, critic, ckpt_meta, saver, extras, DTYPES[cfg.store_dtype])

    if cfg.init_from is not None:
        model, meta = _load_init(cfg, policy, reward, extras, record)
        best_i, best_j = model.i, model.j
    else:
        # 2. probe --------------------------------------------------------------------------------------------------
        t = time.perf_counter()
        generator = torch.Generator().manual_seed(cfg.seed)
        probes = first_items(dataset, cfg.probe.n)
        images = collate_images(probes)  # (N, 3, H, W)
        prompted = cfg.kind == "stitchvm" and cfg.head_conditioning == "prompt"
        head_text = HeadText(policy.encode_prompts) if prompted else None  # stage 1's text rows, reused by the critic
        probe_cond = head_text([caption_of(item) for item in probes]) if prompted else None
        latents = encode_images(policy, images, cfg.probe.batch_size)  # (N, C, h, w)
        want = (policy.latent_channels, policy.latent_size, policy.latent_size)
        if tuple(latents.shape[1:]) != want:
            raise ValueError(f"data images are {tuple(images.shape[2:])}, which the policy's VAE encodes to latents "
                             f"{tuple(latents.shape[1:])}; the policy's transformer works on latents {want} (images of "
                             f"{policy.image_size}x{policy.image_size}): set the data resolution to the policy's")
        sigmas = probe_sigmas(cfg.probe.n, cfg.probe.sigma_law, generator)
        say("probe", f"{cfg.probe.n} clean images {tuple(images.shape[1:])} → latents {tuple(latents.shape[1:])}, "
                     f"t ~ {cfg.probe.sigma_law}")
        times["probe_s"] = time.perf_counter() - t

        # 3. search -------------------------------------------------------------------------------------------------
        t = time.perf_counter()
        if cfg.kind == "stitchvm":
            null = policy.null_embeds()
            depth = max(i_values + ([cfg.search.pinned[0]] if cfg.search.pinned is not None else []))
            head = DiTHead(policy.transformer, depth, null.embeds, null.pooled, policy.latent_size)
            say("search", f"fitting Eq. 7 for i in {i_values}, j in {j_values or 'all <= 4'} "
                          f"({cfg.probe.n} probes x {teacher.num_tokens} tokens = {cfg.probe.n * teacher.num_tokens} "
                          f"rows, {head.width} features)")
            result = search(head, teacher, images, latents, i_values, j_values, cfg.search.pinned, sigmas, generator,
                            cfg.probe.batch_size, cfg.search.criterion, cond=probe_cond)
        else:
            head = latent_head(policy)
            say("search", f"fitting Eq. 7 with the identity head (C = {head.width} features) for j in "
                          f"{j_values or 'all <= 4'}")
            pinned_j = cfg.search.pinned[1] if cfg.search.pinned is not None else None
            result = search_latent(head, teacher, images, latents, j_values, pinned_j, sigmas, generator,
                                   cfg.probe.batch_size, cfg.search.criterion)
        print(format_grid(result), flush=True)
        best_i, best_j = result.best
        fit = result.fits[result.best]
        say("search", f"selected (i, j) = ({best_i}, {best_j}){' (pinned)' if cfg.search.pinned else ''}: "
                      f"rel_mse {fit.rel_mse:.4f}, mse {fit.mse:.4g}")
        extras[INTERFACE_JSON] = (json.dumps(interface_record(result, cfg), indent=2) + "\n").encode()
        if cfg.heatmap is None:
            extras[INTERFACE_PNG] = heatmap_png(result)
        else:  # e.g. docs/img/: a weights directory that holds only .json + .safetensors
            try:
                atomic_write_bytes(cfg.heatmap, heatmap_png(result))
            except OSError as e:  # before stage 2: nothing of the build is lost yet
                raise ConfigError(f"heatmap={cfg.heatmap}: cannot write the stage-1 heatmap there ({e}); give a "
                                  f"writable path, or leave heatmap unset (output_dir/interface.png)") from e
            say("search", f"heatmap → {cfg.heatmap}")
        times["search_s"] = time.perf_counter() - t

        # 4. init ---------------------------------------------------------------------------------------------------
        probe_pixels = preprocess(images.to(device)) if best_j > 1 else None
        meta = {**cfg.meta, "store_dtype": cfg.store_dtype}
        if cfg.kind == "stitchvm":
            null = policy.null_embeds()
            model = build_stitchvm(policy.transformer, reward, best_i, best_j, fit.W, fit.b, null.embeds, null.pooled,
                                   cfg.score, latent_size=policy.latent_size, probe_pixels=probe_pixels,
                                   preprocess=preprocess, bottleneck_ratio=cfg.bottleneck_ratio,
                                   stitch_blocks=cfg.stitch_blocks, meta=meta, encode_prompts=head_text)
        else:
            model = build_vae_stitch(policy, reward, best_j, fit.W, fit.b, cfg.score, probe_pixels=probe_pixels,
                                     preprocess=preprocess, bottleneck_ratio=cfg.bottleneck_ratio,
                                     stitch_blocks=cfg.stitch_blocks, meta=meta)
        model.tail.to(device)
        trained = sum(p.numel() for p in model.stitch_parameters()) + sum(p.numel() for _, p in
                                                                          model.tail_named_parameters())
        say("init", f"{cfg.kind} ({best_i}, {best_j}): stitch F ← W* ({fit.W.shape[0]}x{fit.W.shape[1]}), G ≡ 0; "
                    f"{trained / 1e6:.2f}M trained parameters")

        # 5. distill --------------------------------------------------------------------------------------------
        t = time.perf_counter()
        dcfg = cfg.distill if cfg.distill.ckpt_dir is not None else replace(cfg.distill, ckpt_dir=str(output_dir))
        # captions reach stage 2 for a head that reads them and for the own-caption score term
        captioned = prompted or dcfg.lambda_own_score > 0
        # a resumed build draws other batches than the ones before its checkpoint: the streams' seeds move by the step
        reseed = state.step if state is not None else 0
        stream = ImageStream(dataset, cfg.loader_batch_size, cfg.seed + reseed, cfg.num_workers, captions=captioned)
        ps = cfg.policy_samples
        if ps.n > 0:
            ps_prompts = prompt_list(ps.prompts, "policy_samples.prompts")
            # (stage 1 has already checked that the data's resolution is the policy's)
            t_gen = time.perf_counter()
            bank, bank_latents = generate_samples(policy, ps_prompts, ps)
            times["policy_samples_s"] = time.perf_counter() - t_gen
            # its own seed: the data loader's shuffle already draws from cfg.seed
            stream = MixedStream(stream, bank, ps.fraction, ps.seed + reseed,
                                 sample_prompts(ps_prompts, ps.n) if captioned else None,
                                 bank_latents if ps.student_latents == "own" else None)
            say("distill", f"{ps.n} policy samples ({ps.num_steps} steps, CFG {ps.guidance_scales}, eta {ps.etas}) "
                           f"in {times['policy_samples_s']:.0f} s; {ps.fraction:.0%} of every batch; the student "
                           f"starts from {'their own latents' if ps.student_latents == 'own' else 'E(image)'}")

        def log(step: int, stats: dict) -> None:
            from tqdm.auto import tqdm

            tqdm.write(f"[build:distill] step {step}: loss {stats['distill/loss']:.4g} (embed "
                       f"{stats['distill/embed_loss']:.4g}, token {stats['distill/token_loss']:.4g}, score "
                       f"{stats['distill/score_loss']:.4g}, own score {stats.get('distill/own_score_loss', 0.0):.4g}), "
                       f"lr {stats['distill/lr']:.3g}, grad norm {stats['distill/grad_norm']:.3g}")
            record["last_step"] = step

        steps = dcfg.epochs * steps_per_pass(len(dataset), cfg.loader_batch_size, dcfg.batch_size,
                                             ps.fraction if ps.n > 0 else 0.0)
        steps = min(steps, dcfg.max_steps) if dcfg.max_steps is not None else steps
        # a resumed run stops where the uninterrupted one would have: at max_steps, or where its epochs end, counted
        # as the streams batch them (its own restarted stream cannot tell)
        stop = steps if state is not None else None
        say("distill", f"{steps} steps of {dcfg.batch_size} images, lr {dcfg.lr:g} (stitch "
                       f"x{dcfg.stitch_lr_mult:g}), sigma ~ {dcfg.sigma_sampling}, the teacher on "
                       f"{'D(z0)' if dcfg.teacher_input == 'decoded' else 'x0'}, checkpoints → {dcfg.ckpt_dir}")
        metric = None
        if dcfg.lambda_score > 0:
            captions = prompt_list(cfg.score_captions, "score_captions")
            with torch.no_grad():
                texts = torch.cat([reward.text_embed(captions[k:k + 512]) for k in range(0, len(captions), 512)])
            metric = caption_metric(texts)
            say("distill", f"caption-score term: lambda_score {dcfg.lambda_score:g}, M from {len(captions)} captions")
        if dcfg.lambda_own_score > 0:
            say("distill", f"own-caption score term: lambda_own_score {dcfg.lambda_own_score:g}")
        if state is not None:
            say("distill", f"resuming at step {state.step} from {dcfg.ckpt_dir}")
            record["resumed_from_step"] = state.step
        stats = distill(model, reward, policy.encode, stream, dcfg, callback=log, ckpt_meta=meta, save_fn=save_fn,
                        caption_metric=metric, text_embed_fn=reward.text_embed, decode_fn=policy.decode,
                        resume=state, state_fn=extras.update, stop_step=stop)
        for name in (STATE_TENSORS, STATE_JSON):  # the finished critic (and stage 3's checkpoints) carry no state
            extras.pop(name, None)
        times["distill_s"] = time.perf_counter() - t
        _summarise(record, stats, "distill", dcfg.log_every)
        if state is not None:  # the curve and final values are the resumed part's; the step counts the whole run
            record["distill_steps"] = record["steps"] = state.step + record["distill_steps"]

    # 5b. on-policy value regression (stage 3, optional) --------------------------------------------------------
    if cfg.onpolicy.enabled:
        t = time.perf_counter()
        ocfg = cfg.onpolicy if cfg.onpolicy.ckpt_dir is not None else replace(cfg.onpolicy, ckpt_dir=str(output_dir))
        prompts = prompt_list(ocfg.prompts, "onpolicy.prompts")

        def log_onpolicy(step: int, s: dict) -> None:
            from tqdm.auto import tqdm

            tqdm.write(f"[build:onpolicy] step {step}: loss {s['onpolicy/loss']:.4g} (value "
                       f"{s['onpolicy/value_loss']:.4g}, embed {s['onpolicy/embed_loss']:.4g}, token "
                       f"{s['onpolicy/token_loss']:.4g}), lr {s['onpolicy/lr']:.3g}")
            record["last_onpolicy_step"] = step

        say("onpolicy", f"{ocfg.steps} steps of {ocfg.trajectories} SDE trajectories (eta {ocfg.eta:g}, CFG "
                        f"{ocfg.guidance_scales}, steps {ocfg.num_steps}) x {ocfg.latents_per_trajectory} noise "
                        f"levels, {len(prompts)} prompts, lr {ocfg.lr:g}, checkpoints → {ocfg.ckpt_dir}")
        target = None
        if ocfg.target is not None:
            target = instantiate(ocfg.target, _path="onpolicy.target")
            if not callable(target):
                raise ConfigError(f"onpolicy.target must give a reward r(images, prompts), got {type(target).__name__}")
            meta = {**meta, "value_target": ocfg.target}
            say("onpolicy", f"value target: {ocfg.target.get('_component_')} (the tower {type(reward).__name__} "
                            f"supplies features and prompt embeddings)")
        onpolicy_stats = onpolicy_finetune(model, policy, reward, prompts, ocfg, callback=log_onpolicy,
                                           ckpt_meta=meta, save_fn=save_fn, target=target)
        times["onpolicy_s"] = time.perf_counter() - t
        _summarise(record, onpolicy_stats, "onpolicy", ocfg.log_every)
        stats.update(onpolicy_stats)

    # 6. save ---------------------------------------------------------------------------------------------------
    times["total_s"] = time.perf_counter() - t_start
    save_fn(str(output_dir), model, meta)
    for extra_dir in {d for d in (cfg.distill.ckpt_dir, cfg.onpolicy.ckpt_dir) if d and d != str(output_dir)}:
        save_fn(extra_dir, model, meta)
    final = record.get("final", {})
    loss_key = "onpolicy/loss" if cfg.onpolicy.enabled else "distill/loss"
    say("save", f"{cfg.kind} ({best_i}, {best_j}) → {output_dir.resolve()} "
                f"(final loss {final.get(loss_key, float('nan')):.4g}; {times['total_s']:.0f} s total)")
    return BuildResult(model, result, stats, output_dir, times)


def _summarise(record: dict, stats: dict[str, list[float]], stage: str, log_every: int) -> None:
    """Final values (mean of the last log window) and a <= 100-point curve of a stage into build.json's record."""
    n = len(next(iter(stats.values()))) if stats else 0
    tail_n = min(n, max(1, log_every))
    record.setdefault("final", {}).update({k: sum(v[-tail_n:]) / tail_n for k, v in stats.items() if v})
    record.setdefault("curve", {}).update({k: v[:: max(1, len(v) // 100)] for k, v in stats.items()})
    record[f"{stage}_steps"] = n
    if stage == "distill":
        record["steps"] = n


def steps_per_pass(n: int, loader_batch_size: int, batch_size: int, fraction: float = 0.0) -> int:
    """Optimiser steps in one pass over n images: the loader's batches (the last one partial), each grown by
    MixedStream's round(b f / (1 − f)) policy samples, re-chunked by critics.distill.rebatch, which drops the pass's
    last partial batch."""
    sizes = [loader_batch_size] * (n // loader_batch_size) + ([n % loader_batch_size] if n % loader_batch_size else [])
    return sum(b + (round(b * fraction / (1 - fraction)) if fraction else 0) for b in sizes) // batch_size


# what may differ between a build and its resumption: none of it changes what is computed
RESUME_FREE_KEYS = {"resume", "num_workers", "device", "heatmap", "distill.progress", "distill.log_every",
                    "distill.ckpt_every", "distill.check_teacher", "onpolicy.progress", "onpolicy.log_every",
                    "onpolicy.ckpt_every"}
RESUME_PATH_KEYS = {"output_dir", "distill.ckpt_dir", "onpolicy.ckpt_dir"}  # compared as the directories they name


def _resume_state(cfg: BuildConfig) -> DistillState:
    """The stage-2 state in the checkpoint a build with ``resume`` goes on from, after checking that the checkpoint
    was written by this config (ConfigError naming what differs otherwise)."""
    where = Path(cfg.distill.ckpt_dir or cfg.output_dir)
    try:
        state = DistillState.read(where)
        saved = json.loads((where / BUILD_JSON).read_text())["config"]
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"resume: {e}") from e

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and "_component_" not in v else
                       {f"{prefix}{k}": v})
        return out

    saved, asked = flat(saved), flat(json.loads(json.dumps(to_dict(cfg))))
    for flat_cfg in (saved, asked):  # a checkpoint directory is the output_dir when ckpt_dir is null
        for key in RESUME_PATH_KEYS - {"output_dir"}:
            flat_cfg[key] = flat_cfg.get(key) or flat_cfg.get("output_dir")
        for key in RESUME_PATH_KEYS:
            flat_cfg[key] = str(Path(flat_cfg[key]).resolve()) if flat_cfg.get(key) else flat_cfg.get(key)
    differ = sorted(k for k in saved.keys() | asked.keys()
                    if k not in RESUME_FREE_KEYS and saved.get(k, "<unset>") != asked.get(k, "<unset>"))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k, '<unset>')!r} there, {asked.get(k, '<unset>')!r} here"
                          for k in differ[:5])
        raise ConfigError(f"resume: the checkpoint in {where} was written by another config ({shown}"
                          f"{'; ...' if len(differ) > 5 else ''}): resume with the config that wrote it, or build "
                          f"from the start")
    return state


def _load_init(cfg: BuildConfig, policy, reward, extras: dict[str, bytes], record: dict) -> tuple[StitchVM, dict]:
    """The critic saved at cfg.init_from (same kind), its interface record carried into `extras`."""
    from critics import load

    source = load.resolve_path(cfg.init_from)
    if cfg.kind == "stitchvm":  # it may have been regressed onto another target: the build retargets it anyway
        model = load.stitchvm(policy, reward, source, check_target=False)
    else:
        model = load.vae_stitch(policy, reward, source)
    if cfg.kind == "stitchvm" and model.head_conditioning != cfg.head_conditioning:
        raise ConfigError(f"head_conditioning: the critic at {source} has a {model.head_conditioning} head; set "
                          f"head_conditioning={model.head_conditioning} (stage 3 keeps the head it was distilled with)")
    saved = model.stitch.config()
    asked = {"bottleneck_ratio": cfg.bottleneck_ratio, "stitch_blocks": cfg.stitch_blocks}
    if saved != asked:  # stage 3 trains the stitch the critic has; the build record must not say otherwise
        key = next(k for k in saved if saved[k] != asked[k])
        raise ConfigError(f"{key}: the critic at {source} has {key}={saved[key]}; set {key}={saved[key]} "
                          f"(stage 3 keeps the stitch it starts from)")
    model.tail.to(policy.device)
    if model.class_token is not None:
        model.class_token.data = model.class_token.data.to(policy.device)
    for name in (INTERFACE_JSON, INTERFACE_PNG):
        if (source / name).exists() and (name != INTERFACE_PNG or cfg.heatmap is None):
            extras[name] = (source / name).read_bytes()
    if (source / BUILD_JSON).exists():
        record["init_from"] = {"path": str(cfg.init_from), "build": json.loads((source / BUILD_JSON).read_text())}
    meta = {**model.meta, "store_dtype": cfg.store_dtype}
    say("init", f"{cfg.kind} ({model.i}, {model.j}) loaded from {source} (stages 2-5 skipped)")
    return model, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="critics.build", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides: dotted keys, e.g. distill.max_steps=100 search.pinned=[4,1] "
                                            "kind=vae_stitch. --help-config lists every key.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"build YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="describe every config key and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    if args.help_config:
        print(config_help(BuildConfig))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        build(cfg)
    except KeyboardInterrupt:
        # every save swaps the whole directory in atomically, so what is there is a critic that loads, or nothing
        print(f"interrupted: {cfg.output_dir} holds the build's last complete checkpoint, if it wrote one "
              f"(it loads as a critic); add resume=true to the same command to go on with stage 2 from it, or run the "
              f"command again to build from the start", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
