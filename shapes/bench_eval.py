"""Benchmark ShapesEval on ground-truth renders: clean, perturbed, shuffled, and its speed.

    python -m shapes.bench_eval --num 500 --seed 0

Rows (all on test-split renders at 64^2, canonical captions):
  clean                 the renders as drawn
  blur / noise / jpeg   Gaussian blur (sigma = 1 px) / additive Gaussian noise (sigma = 0.05, clipped) /
                        JPEG at quality 40 (PIL, 4:2:0 chroma subsampling), each alone
  blur+noise+jpeg       the three in that order
  shuffled              clean renders scored against another render's caption (a random derangement)
  chance (oracle)       the shuffled pairs scored from the generator's own object lists instead of pixels:
                        what a perfect checker would give, i.e. the chance level the shuffled row should match
Columns are means over images; ``position`` is averaged over relation prompts only (it is N/A otherwise).
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from shapes.data import PlacedObject, caption, render_with_layout, sample_spec
from shapes.eval import CRITERIA, DetectedObject, ShapesEval, score_objects

BLUR_SIGMA = 1.0  # px
NOISE_STD = 0.05  # in [0, 1] units
JPEG_QUALITY = 40


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


def perturbations(images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The benchmark's image conditions, keyed by row name; (N, H, W, 3) float in [0, 1] each."""
    rng = np.random.default_rng(seed)
    return {
        "clean": images,
        "blur": blur(images),
        "noise": add_noise(images, rng),
        "jpeg": jpeg(images),
        "blur+noise+jpeg": jpeg(add_noise(blur(images), rng)),
    }


def ground_truth(num: int, seed: int, split: str = "test", size: int = 64):
    """``num`` renders of ``split`` specs: images (N, H, W, 3) float, canonical captions, placed objects."""
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
    """A random permutation with no fixed point (n >= 2)."""
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def summarise(result, has_relation: torch.Tensor) -> dict[str, float]:
    """Means of a ShapesEvalResult; position over relation prompts only."""
    row = {k: float(getattr(result, k).mean()) for k in CRITERIA if k != "position"}
    row["position"] = float(result.position[has_relation].mean())
    return row


def _as_detected(obj: PlacedObject) -> DetectedObject:
    return DetectedObject(obj.color, obj.shape, obj.cx, obj.cy, area=0, shape_iou=1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=500, help="number of test-split renders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    images, captions, layouts = ground_truth(args.num, args.seed)
    checker = ShapesEval()
    rows: dict[str, dict[str, float]] = {}
    seconds = 0.0
    for name, batch in perturbations(images, args.seed + 1).items():
        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        start = time.perf_counter()
        result = checker(tensor, captions)
        seconds += time.perf_counter() - start
        rows[name] = summarise(result, result.has_relation)
    images_per_s = len(rows) * args.num / seconds

    perm = derangement(args.num, np.random.default_rng(args.seed + 2))
    shuffled = [captions[p] for p in perm]
    result = checker(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), shuffled)
    rows["shuffled"] = summarise(result, result.has_relation)
    oracle = [score_objects([_as_detected(o) for o in layout], checker_spec) for layout, checker_spec in
              zip(layouts, (_spec_of(c) for c in shuffled))]
    rows["chance (oracle)"] = {k: float(np.mean([o[k] for o in oracle])) for k in CRITERIA if k != "position"}
    rows["chance (oracle)"]["position"] = float(result.position.new_tensor(
        [o["position"] for o in oracle])[result.has_relation].mean())

    print(f"ShapesEval on {args.num} test-split renders (64x64, seed {args.seed}); position over "
          f"{int(result.has_relation.sum())} relation prompts (shuffled rows: the shuffled captions')")
    header = f"{'condition':<18}" + "".join(f"{k:>10}" for k in CRITERIA)
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:<18}" + "".join(f"{row[k]:>10.3f}" for k in CRITERIA))
    print(f"speed: {images_per_s:.0f} images/s (one thread, {args.num} images x {len(rows) - 2} conditions)")


def _spec_of(text: str):
    from shapes.data import parse_caption

    return parse_caption(text)


if __name__ == "__main__":
    main()
