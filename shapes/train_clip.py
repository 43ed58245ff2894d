"""Train the Shapes CLIP reward: an open_clip ``CLIP`` from a small config, contrastively on Shapes renders.

    python -m shapes.train_clip --device cuda                      # the shipped reward (~3.5 min on one H200)
    python -m shapes.train_clip --steps 10 --num_train 256 ...     # a CPU smoke run

Objective: symmetric InfoNCE (Radford et al. 2021) with hard text negatives. For a batch of B images x_i with
captions c_i and, per image, K captions c_ik of *nearby specs* (one of count / colour / shape / relation /
group order changed, a group dropped or added: ``perturb_spec``),

    L = 1/2 [ CE_i( s * <f(x_i), g(t)> over t in {c_1..c_B} U {c_jk} ) + CE_i( s * <g(c_i), f(x_j)> over j ) ]

with f, g the L2-normalised image / text embeddings and s = exp(logit_scale) learnt. Captions that describe the
same scene as the positive (the same spec, another image of it, "A right of B" = "B left of A") are masked out
of its denominator rather than pushed away. The hard negatives teach what ShapesEval checks: counts, relations
and "nothing else in the image".

Data. The reward stands in for a broadly pretrained CLIP, so it sees every colour-shape pair: training images
are ShapesDataset('train', num_train, DATA_SEED) + ShapesDataset('test', num_test, DATA_SEED), captions in
varied phrasing; evaluation images (shapes.bench_world.EVAL_SEED) are other renders. Only the *policy* is kept
away from the held-out pairs. Images are augmented on the device so the score is robust to model samples:
Gaussian blur (sigma up to 1.2 px), resampling through half resolution, and pixel noise (std up to 0.06).

Pixels enter the vision tower exactly as ``critics.rewards.clip_score.CLIPScore`` feeds them
(``critics.rewards.base.preprocess``), so training and scoring cannot drift.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import trange

from shapes import models
from shapes.data import COLORS, MAX_COUNT, RELATIONS, SHAPES, ObjectGroup, PromptSpec, caption, parse_caption
from shapes.training import (Deadline, autocast, check_finite, generators, lr_at, parse_args, render,
                             resolve_device, seed_everything, set_lr, to_json, to_unit, write_json)

DATA_SEED = 1  # differs from the VAE/flow training images (seed 0) and the evaluation images


@dataclass
class CLIPArgs:
    """Arguments of the CLIP run (the defaults are the shipped model's)."""

    out_dir: str = str(models.WEIGHTS_DIR)
    """weights directory; the model goes to <out_dir>/clip, the tokenizer to <out_dir>/tokenizer.json"""
    device: str = "cpu"
    seed: int = 0
    num_train: int = 70000
    """train-split renders"""
    num_test: int = 30000
    """test-split renders (other images than the evaluation ones)"""
    hard_pool: int = 4
    """hard-negative captions prepared per image"""
    hard_per_image: int = 2
    """K: hard negatives per image in a batch"""
    steps: int = 4000
    batch_size: int = 512
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.1
    embed_dim: int = 128
    vision_width: int = 192
    vision_layers: int = 6
    head_width: int = 32
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    blur_prob: float = 0.4
    resample_prob: float = 0.2
    noise_prob: float = 0.4
    max_noise: float = 0.06
    max_blur: float = 1.2
    eval_images: int = 512
    workers: int = 0
    """rendering processes (0 = all cores)"""
    log_every: int = 50
    """steps between logged losses (the first and last step are always logged)"""
    max_minutes: float = 0.0
    """wall-clock guard for jobs with a hard limit (0 = none); stopping early is logged as such"""


# ---------------------------------------------------------------------------------------------------------
# Hard negatives
# ---------------------------------------------------------------------------------------------------------

_MIRROR = {"right of": "left of", "below": "above"}


def spec_key(spec: PromptSpec) -> str:
    """A key equal for specs that describe the same scenes: "A right of B" = "B left of A", "A and B" = "B and A"."""
    groups, relation = list(spec.groups), spec.relation
    if relation in _MIRROR:
        groups, relation = groups[::-1], _MIRROR[relation]
    elif relation is None and len(groups) == 2:
        groups = sorted(groups, key=lambda g: (g.count, g.color, g.shape))
    return ";".join(f"{g.count} {g.color} {g.shape}" for g in groups) + f"|{relation}"


def _edit_group(group: ObjectGroup, op: str, rng: np.random.Generator, max_count: int) -> ObjectGroup:
    if op == "count":
        return ObjectGroup(int(rng.choice([n for n in range(1, max_count + 1) if n != group.count])), group.color,
                           group.shape)
    if op == "color":
        return ObjectGroup(group.count, str(rng.choice([c for c in COLORS if c != group.color])), group.shape)
    return ObjectGroup(group.count, group.color, str(rng.choice([s for s in SHAPES if s != group.shape])))


def perturb_spec(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """A spec near ``spec`` that describes different scenes (``spec_key`` differs): one edit of count, colour or
    shape of a group; for two groups also dropping one, and with a relation changing it or swapping the groups;
    for one group adding a second one. "A and B" never becomes "A <relation> B" (an image of one can satisfy
    the other), and a relation never becomes "and" for the same reason."""
    ops = ["count", "color", "shape"]
    if len(spec.groups) == 2:
        ops.append("drop")
        if spec.relation is not None:
            ops += ["relation", "swap"]
    else:
        ops.append("add")
    key = spec_key(spec)
    for _ in range(100):
        op = ops[rng.integers(len(ops))]
        groups, relation = list(spec.groups), spec.relation
        if op in ("count", "color", "shape"):
            g = int(rng.integers(len(groups)))
            groups[g] = _edit_group(groups[g], op, rng, MAX_COUNT)
        elif op == "drop":
            groups, relation = [groups[int(rng.integers(2))]], None
        elif op == "add":
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            groups.append(ObjectGroup(int(rng.integers(1, 3)), color, shape))
            relation = None if rng.random() < 0.3 else str(rng.choice(RELATIONS))
        elif op == "relation":
            relation = str(rng.choice([r for r in RELATIONS if r != spec.relation]))
        else:  # swap
            groups = groups[::-1]
        try:
            other = PromptSpec(tuple(groups), relation)
        except ValueError:  # e.g. both groups now the same colour and shape
            continue
        if spec_key(other) != key:
            return other
    raise RuntimeError(f"could not perturb {caption(spec)!r}")


def _prepare_range(job: tuple[list[str], int, int, int]) -> tuple[list[str], list[str], list[str]]:
    """Keys, ``pool`` hard-negative captions per caption (varied phrasing) and their keys, for captions given from
    index ``start`` on; the rng of item i is (seed, i), so the result does not depend on the chunking."""
    captions, seed, start, pool = job
    keys, negatives, neg_keys = [], [], []
    for offset, text in enumerate(captions):
        rng = np.random.default_rng((seed, start + offset))
        spec = parse_caption(text)
        keys.append(spec_key(spec))
        for _ in range(pool):
            other = perturb_spec(spec, rng)
            negatives.append(caption(other, rng))
            neg_keys.append(spec_key(other))
    return keys, negatives, neg_keys


def prepare_text(captions: list[str], tokenize, seed: int, pool: int, workers: int | None = None):
    """Token ids (N, L), hard-negative ids (N, pool, L), key ids of captions (N,) and of negatives (N, pool)."""
    workers = max(1, min(workers or os.cpu_count() or 1, 32, max(1, len(captions) // 1024)))
    bounds = np.linspace(0, len(captions), workers * 4 + 1).astype(int)
    jobs = [(captions[a:b], seed, int(a), pool) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers == 1:
        parts = [_prepare_range(job) for job in jobs]
    else:
        with mp.get_context("fork").Pool(workers) as p:
            parts = p.map(_prepare_range, jobs)
    keys = [k for part in parts for k in part[0]]
    negatives = [t for part in parts for t in part[1]]
    neg_keys = [k for part in parts for k in part[2]]
    key_ids: dict[str, int] = {}
    ids = torch.tensor([key_ids.setdefault(k, len(key_ids)) for k in keys])
    neg_ids = torch.tensor([key_ids.setdefault(k, len(key_ids)) for k in neg_keys]).view(len(captions), pool)
    tokens = tokenize(captions)
    neg_tokens = tokenize(negatives).view(len(captions), pool, -1)
    return tokens, neg_tokens, ids, neg_ids


# ---------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample Gaussian blur of (B, C, H, W) with sigma (B,) px (0 = identity), separable, reflect padding."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (k,)
    weights = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)  # (B, k)
    weights = weights / weights.sum(1, keepdim=True)
    b, c, h, w = x.shape
    kernel = weights.repeat_interleave(c, 0)  # (B*C, k)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: Tensor, args: CLIPArgs, generator: torch.Generator, noise_generator: torch.Generator) -> Tensor:
    """Blur / resample / noise, each with its probability, per sample; x (B, 3, H, W) in [0, 1].
    ``generator`` (CPU) draws the per-sample choices, ``noise_generator`` (on x's device) the pixel noise."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator).to(x.device)
    sigma = torch.where(u[:, 0] < args.blur_prob, u[:, 1] * args.max_blur, torch.zeros_like(u[:, 1]))
    x = gaussian_blur(x, sigma)
    resample = (u[:, 2] < args.resample_prob).view(b, 1, 1, 1).float()
    half = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True),
                         size=x.shape[-2:], mode="bilinear")
    x = resample * half + (1 - resample) * x
    std = torch.where(u[:, 3] < args.noise_prob, u[:, 4] * args.max_noise, torch.zeros_like(u[:, 4]))
    noise = torch.randn(x.shape, generator=noise_generator, device=x.device)
    return (x + std.view(b, 1, 1, 1) * noise).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------


def contrastive_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, img_keys: Tensor, txt_keys: Tensor):
    """Symmetric InfoNCE with hard negatives and same-scene masking (module docstring).

    Args:
        img: (B, D) normalised image embeddings; image i's positive is txt[i].
        txt: (B + M, D) normalised text embeddings: the B captions, then M hard negatives.
        logit_scale: log s.
        img_keys: (B,) scene ids of the images; txt_keys: (B + M,) scene ids of the texts.
    Returns:
        (loss, image->text top-1 accuracy)
    """
    b = img.shape[0]
    scale = logit_scale.exp()
    target = torch.arange(b, device=img.device)
    same = img_keys[:, None] == txt_keys[None, :]  # (B, B + M)
    same[target, target] = False
    logits = (scale * img @ txt.T).float().masked_fill(same, float("-inf"))
    loss_i2t = F.cross_entropy(logits, target)
    logits_t2i = (scale * txt[:b] @ img.T).float().masked_fill(same[:, :b].T, float("-inf"))
    loss_t2i = F.cross_entropy(logits_t2i, target)
    accuracy = (logits.argmax(1) == target).float().mean()
    return (loss_i2t + loss_t2i) / 2, accuracy


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def train(args: CLIPArgs) -> dict:
    from critics.rewards.base import preprocess, tower_preprocess_cfg
    from shapes import bench_world

    device = resolve_device(args.device)
    seed_everything(args.seed)
    deadline = Deadline(args.max_minutes)
    t0 = time.perf_counter()
    tokenizer = models.build_tokenizer()
    tokenize = models.WordTokenize(tokenizer, models.CONTEXT_LENGTH)
    parts = [render(split, n, DATA_SEED, args.workers or None)
             for split, n in (("train", args.num_train), ("test", args.num_test)) if n > 0]
    images = torch.cat([p[0] for p in parts]).to(device)  # (N, 3, 64, 64) uint8
    captions = [c for p in parts for c in p[1]]
    tokens, neg_tokens, keys, neg_keys = (t.to(device) for t in
                                          prepare_text(captions, tokenize, args.seed, args.hard_pool, args.workers))
    prep_s = time.perf_counter() - t0

    config = models.clip_config(len(tokenizer), models.CONTEXT_LENGTH, args.embed_dim, images.shape[-1],
                                vision_width=args.vision_width, vision_layers=args.vision_layers,
                                head_width=args.head_width, text_width=args.text_width, text_heads=args.text_heads,
                                text_layers=args.text_layers)
    model = models.build_clip(config).to(device).train()
    pre_cfg = tower_preprocess_cfg(model.visual)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    gen, device_gen = generators(args.seed, device)
    n, b, k = images.shape[0], args.batch_size, args.hard_per_image

    log, stopped_at, last_step = [], None, args.steps - 1
    t_train = time.perf_counter()
    bar = trange(args.steps, desc="clip", mininterval=2.0)
    for step in bar:
        set_lr(optimizer, lr_at(step, args.lr, args.warmup, args.steps))
        idx = torch.randint(n, (b,), generator=gen).to(device)
        pick = torch.randint(args.hard_pool, (b, k), generator=gen).to(device)
        x = augment(to_unit(images[idx]), args, gen, device_gen)
        texts = torch.cat([tokens[idx], neg_tokens[idx[:, None], pick].reshape(b * k, -1)])  # (B + BK, L)
        txt_keys = torch.cat([keys[idx], neg_keys[idx[:, None], pick].reshape(-1)])
        with autocast(device):
            img = model.encode_image(preprocess(x, pre_cfg), normalize=True)
            txt = model.encode_text(texts, normalize=True)
        loss, accuracy = contrastive_loss(img.float(), txt.float(), model.logit_scale, keys[idx], txt_keys)
        check_finite(loss, step, "clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % args.log_every == 0 or step == last_step:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy.item():.2f}")
            log.append({"step": step, "loss/contrastive": loss.item(), "train/top1_hard_batch": accuracy.item(),
                        "train/logit_scale": model.logit_scale.exp().item()})
        if deadline.expired():
            stopped_at = step + 1
            print(f"clip: STOPPED EARLY by --max_minutes at step {stopped_at} of {args.steps}")
            break
    train_s = time.perf_counter() - t_train

    models.save_clip(model.eval(), config, tokenizer, args.out_dir)
    reward = models.load_shapes_reward(device, weights_dir=args.out_dir)  # the shipped fp16 artifact
    test_images, test_captions = bench_world.test_images(args.eval_images, workers=args.workers or None)
    retrieval = bench_world.clip_retrieval(reward, test_images, test_captions)
    metrics = {**retrieval, "clip/params": sum(p.numel() for p in model.parameters()),
               "time/prepare_s": prep_s, "time/train_s": train_s, "time/steps_done": stopped_at or args.steps,
               "stopped_early": stopped_at is not None,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "args": to_json(args), "log": log}
    write_json(Path(args.out_dir) / "logs" / "clip.json", metrics)
    print(f"clip: top-1 among {bench_world.RETRIEVAL_GROUP}: {retrieval['clip/top1_in_batch']:.3f} in-batch, "
          f"{retrieval['clip/top1_hard']:.3f} hard ({retrieval['clip/num_images']} test images); trained {train_s:.0f}s")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(CLIPArgs, argv, __doc__))


if __name__ == "__main__":
    main()
