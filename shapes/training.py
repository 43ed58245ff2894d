"""Pieces the Shapes training scripts share: dataset rendering, CLI from a dataclass, EMA, precision, timing.

The scripts (``train_vae``, ``train_clip``, ``train_flow``) each read top to bottom; what they would otherwise copy
lives here once.

Rendering. ``ShapesDataset`` items are pure functions of (split, seed, index), so a pool of worker processes can
render index ranges independently and the result does not depend on the number of workers. Images are kept as
uint8 (N, 3, 64, 64) tensors (12 KB each) and moved to the training device once: the models are small, so feeding
them from a DataLoader would cost more than the step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing as mp
import os
import time
import typing
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rl.checkpoint import atomic_write_bytes
from shapes.data import ShapesDataset

# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _single_thread() -> None:
    torch.set_num_threads(1)  # forked workers: no nested thread pools (and no OpenMP state shared with the parent)


def _render_range(job: tuple[str, int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    split, num, seed, start, stop = job
    dataset = ShapesDataset(split, num, seed)
    images = np.empty((stop - start, 3, dataset.size, dataset.size), dtype=np.uint8)
    captions = []
    for row, index in enumerate(range(start, stop)):
        item = dataset[index]
        images[row] = (item["image"] * 255.0).round().to(torch.uint8).numpy()
        captions.append(item["caption"])
    return images, captions


def render(split: str, num: int, seed: int, workers: int | None = None) -> tuple[Tensor, list[str]]:
    """The first ``num`` items of ``ShapesDataset(split, num, seed)``: uint8 images (N, 3, 64, 64), captions.

    Identical for any ``workers`` (default: all cores, at most 32); ``workers=1`` renders in-process.
    """
    workers = max(1, min(workers or os.cpu_count() or 1, 32, max(1, num // 256)))
    if num == 0:
        raise ValueError("num must be >= 1")
    bounds = np.linspace(0, num, workers * 4 + 1 if workers > 1 else 2).astype(int)
    jobs = [(split, num, seed, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers == 1:
        parts = [_render_range(job) for job in jobs]
    else:
        # fork keeps start-up cheap; the workers only run numpy (no CUDA has been touched by this helper)
        with mp.get_context("fork").Pool(workers, initializer=_single_thread) as pool:
            parts = pool.map(_render_range, jobs)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    captions = [c for p in parts for c in p[1]]
    return images, captions


def to_unit(images_u8: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1] on the same device."""
    return images_u8.float().div_(255.0)


# ---------------------------------------------------------------------------------------------------------
# CLI from a dataclass (every field becomes --field; tuples are comma-separated)
# ---------------------------------------------------------------------------------------------------------


def _parse_tuple(kind):
    def parse(text: str):
        return tuple(kind(x) for x in text.split(",") if x)

    return parse


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    """Build ``cls`` (a dataclass of simple fields) from ``--field value`` arguments; unknown ones are errors."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        origin = typing.get_origin(hint)
        if origin is tuple:
            kind = typing.get_args(hint)[0]
            parser.add_argument(f"--{field.name}", type=_parse_tuple(kind), default=default,
                                help=f"comma-separated (default {','.join(map(str, default))})")
        elif hint is bool:
            parser.add_argument(f"--{field.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                                help=f"true/false (default {default})")
        else:
            kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if origin else hint
            parser.add_argument(f"--{field.name}", type=kind, default=default, help=f"(default {default})")
    return cls(**vars(parser.parse_args(argv)))


def to_json(args) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(args).items()}


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------
# Training utilities
# ---------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(CPU generator for batch indices and small draws, generator on ``device`` for bulk noise), both from
    ``seed``: bulk noise drawn on the CPU and copied would cost more than a small model's step."""
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the models are small and bf16 needs no loss scaling); full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, base_lr: float, warmup: int, total: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_frac * base_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up of the decay,
    min(decay, (1 + step) / (10 + step)), so early averages are not dominated by the random init."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.step = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.step += 1
        decay = min(self.decay, (1 + self.step) / (10 + self.step))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), module.buffers()):
            ema_buf.copy_(buf)


def check_finite(loss: Tensor, step: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: non-finite loss {loss.item()} at step {step}; lower the learning rate")


class Deadline:
    """A wall-clock guard for GPU jobs with a hard time limit: ``expired()`` after ``minutes`` (0 = never).

    Training budgets are step counts (so runs are reproducible); the deadline only stops a run that would
    otherwise be killed, and the script then says so loudly in its log and metrics.
    """

    def __init__(self, minutes: float):
        self.start = time.perf_counter()
        self.seconds = minutes * 60.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.seconds > 0 and self.elapsed() > self.seconds


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; pass --device cpu")
    return device


def psnr(reference: Tensor, estimate: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]: (B, 3, H, W) x 2 -> (B,)."""
    mse = (reference.float() - estimate.float()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))
