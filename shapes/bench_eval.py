"""Benchmark ShapesEval on ground-truth renders: clean, perturbed, mismatched captions, and its speed.

    python -m shapes.bench_eval --num 500 --seed 0

Rows (test-split renders at 64^2, canonical captions):
  clean                 the renders as drawn
  blur / noise / jpeg   Gaussian blur (sigma = 1 px) / additive Gaussian noise (sigma = 0.05, clipped) /
                        JPEG at quality 40 (PIL, 4:2:0 chroma subsampling), each alone
  blur+noise+jpeg       the three in that order
  stress: ...           harder versions (blur sigma = 1.5 px; JPEG quality 30; all three at those levels),
                        for headroom only (no target)
  shuffled              clean renders scored against another render's caption (a random derangement)
  chance (oracle)       the same shuffled pairs scored from the generator's object lists instead of pixels,
                        i.e. what a perfect checker gives: the chance level the shuffled row should match
  edited caption        clean renders scored against their caption with one attribute changed (a count
                        +-1, a colour, a shape, or the relation reversed); a perfect checker gives 0
Columns are means over images; ``position`` is averaged over relation prompts only (it is N/A otherwise).
Speed is ShapesEval.__call__ throughput on one thread over the five target conditions, per CPU-second of
this process (robust to other load on the machine) and per wall-clock second.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from shapes.data import (
    COLORS,
    MAX_COUNT,
    SHAPES,
    PlacedObject,
    PromptSpec,
    caption,
    parse_caption,
    render_with_layout,
    sample_spec,
)
from shapes.eval import CRITERIA, DetectedObject, ShapesEval, ShapesEvalResult, score_objects

BLUR_SIGMA = 1.0  # px
NOISE_STD = 0.05  # in [0, 1] units
JPEG_QUALITY = 40
STRESS_BLUR_SIGMA = 1.5
STRESS_JPEG_QUALITY = 30
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def blur(images: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Gaussian blur of (N, H, W, 3) float images in [0, 1]."""
    return ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="nearest")


def add_noise(images: np.ndarray, rng: np.random.Generator, std: float = NOISE_STD) -> np.ndarray:
    """Additive Gaussian noise on (N, H, W, 3) float images, clipped to [0, 1]."""
    return np.clip(images + rng.normal(0.0, std, images.shape).astype(np.float32), 0.0, 1.0)


def jpeg(images: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG round trip of (N, H, W, 3) float images in [0, 1] (PIL defaults: 4:2:0 chroma subsampling)."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer), dtype=np.float32) / 255.0
    return out


def perturbations(images: np.ndarray, seed: int, stress: bool = False) -> dict[str, np.ndarray]:
    """The benchmark's image conditions by row name, each (N, H, W, 3) float in [0, 1]."""
    rng = np.random.default_rng(seed)
    rows = {
        "clean": images,
        "blur": blur(images),
        "noise": add_noise(images, rng),
        "jpeg": jpeg(images),
        "blur+noise+jpeg": jpeg(add_noise(blur(images), rng)),
    }
    if stress:
        rows["stress: blur 1.5"] = blur(images, STRESS_BLUR_SIGMA)
        rows["stress: jpeg q30"] = jpeg(images, STRESS_JPEG_QUALITY)
        rows["stress: all three"] = jpeg(add_noise(blur(images, STRESS_BLUR_SIGMA), rng), STRESS_JPEG_QUALITY)
    return rows


def ground_truth(
    num: int, seed: int, split: str = "test", size: int = 64
) -> tuple[np.ndarray, list[str], list[tuple[PlacedObject, ...]]]:
    """``num`` renders of ``split`` specs: images (N, H, W, 3) float in [0, 1], canonical captions, layouts."""
    rng = np.random.default_rng(seed)
    images, captions, layouts = [], [], []
    for _ in range(num):
        spec = sample_spec(rng, split)
        image, objects = render_with_layout(spec, rng, size)
        images.append(image)
        captions.append(caption(spec))
        layouts.append(objects)
    return np.stack(images).astype(np.float32) / 255.0, captions, layouts


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def edit_spec(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """``spec`` with exactly one attribute changed, so that no image of ``spec`` satisfies the result:
    one group's count (+-1), colour or shape, or the relation reversed."""
    while True:
        kinds = ["count", "color", "shape"] + (["relation"] if spec.relation is not None else [])
        kind = kinds[rng.integers(len(kinds))]
        if kind == "relation":
            return replace(spec, relation=_OPPOSITE[spec.relation])
        gi = int(rng.integers(len(spec.groups)))
        group = spec.groups[gi]
        if kind == "count":
            options = [n for n in (group.count - 1, group.count + 1) if 1 <= n <= MAX_COUNT]
            new = replace(group, count=options[rng.integers(len(options))])
        elif kind == "color":
            options = [c for c in COLORS if c != group.color]
            new = replace(group, color=options[rng.integers(len(options))])
        else:
            options = [s for s in SHAPES if s != group.shape]
            new = replace(group, shape=options[rng.integers(len(options))])
        groups = spec.groups[:gi] + (new,) + spec.groups[gi + 1 :]
        if len(groups) == 1 or (groups[0].color, groups[0].shape) != (groups[1].color, groups[1].shape):
            return replace(spec, groups=groups)


def summarise(result: ShapesEvalResult) -> dict[str, float]:
    """Means of a ShapesEvalResult; position over relation prompts only."""
    row = {k: float(getattr(result, k).mean()) for k in CRITERIA if k != "position"}
    row["position"] = float(result.position[result.has_relation].mean())
    return row


def oracle_row(layouts: list[tuple[PlacedObject, ...]], captions: list[str]) -> dict[str, float]:
    """Scores from the generator's object lists (a perfect detector) instead of pixels."""
    scores = []
    for layout, text in zip(layouts, captions):
        objects = [DetectedObject(o.color, o.shape, o.cx, o.cy, area=0, shape_score=1.0) for o in layout]
        scores.append(score_objects(objects, parse_caption(text)))
    has_relation = np.array([parse_caption(t).relation is not None for t in captions])
    row = {k: float(np.mean([s[k] for s in scores])) for k in CRITERIA if k != "position"}
    row["position"] = float(np.mean([s["position"] for s, r in zip(scores, has_relation) if r]))
    return row


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=500, help="number of test-split renders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    images, captions, layouts = ground_truth(args.num, args.seed)
    checker = ShapesEval()
    rows: dict[str, dict[str, float]] = {}
    wall, cpu, timed = 0.0, 0.0, 0
    for name, batch in perturbations(images, args.seed + 1, stress=True).items():
        tensor = _to_tensor(batch)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        rows[name] = summarise(checker(tensor, captions))
        if not name.startswith("stress"):
            wall += time.perf_counter() - start_wall
            cpu += time.process_time() - start_cpu
            timed += args.num

    shuffled = [captions[p] for p in derangement(args.num, np.random.default_rng(args.seed + 2))]
    rows["shuffled"] = summarise(checker(_to_tensor(images), shuffled))
    rows["chance (oracle)"] = oracle_row(layouts, shuffled)
    rng = np.random.default_rng(args.seed + 3)
    edited = [caption(edit_spec(parse_caption(c), rng)) for c in captions]
    rows["edited caption"] = summarise(checker(_to_tensor(images), edited))

    n_relation = sum(parse_caption(c).relation is not None for c in captions)
    print(f"ShapesEval on {args.num} test-split renders (64x64, seed {args.seed}); "
          f"position over the {n_relation} relation prompts (shuffled/edited rows: their captions' relations)")
    header = f"{'condition':<20}" + "".join(f"{k:>10}" for k in CRITERIA)
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:<20}" + "".join(f"{row[k]:>10.3f}" for k in CRITERIA))
    print(f"speed: {timed / cpu:.0f} images per CPU-second ({timed / wall:.0f} images/s wall clock; "
          f"ShapesEval.__call__ on one thread, {timed} images)")


if __name__ == "__main__":
    main()
