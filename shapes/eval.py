"""ShapesEval: a GenEval-style checker for the Shapes world that reads pixels only.

It parses the prompt (``shapes.data.parse_caption``), finds the objects in the image, and scores the
image against the prompt. It never sees generator metadata, so it scores model samples and ground-truth
renders alike.

Detection (``detect_objects``), for an (H, W, 3) image (pixel constants are for 64^2 and scale with size):
  1. Smooth lightly (Gaussian, 0.6 px) to tame pixel noise and JPEG ringing.
  2. Background colour b = per-channel median of the one-pixel border.
  3. Colour unmixing. A pixel on an object edge (antialiasing, blur, JPEG) is a mix of b and the object's
     colour, so for every palette colour c_k the pixel p is projected onto the segment b -> c_k:
     alpha_k = clip(<p - b, c_k - b> / |c_k - b|^2, 0, 1), residual_k = |p - b - alpha_k (c_k - b)|.
     The pixel gets the colour with the smallest residual; it is foreground when that colour's alpha > 0.5
     and its residual < ``MAX_RESIDUAL`` (colours far from every palette line are not objects).
  4. Connected components (8-connected) per colour, so touching objects of different colours separate;
     components under ``MIN_AREA`` px (a third of the smallest rendered object) are noise or edge fringe.
  5. Shape, by soft template matching in a whitened frame. The component's soft mask (alpha_k within
     ``PAD`` px of its box, other components' pixels zeroed, remapped by clip((alpha - 0.15) / 0.7, 0, 1)
     to drop background noise) is resampled (bilinear) on a ``PATCH_SIZE``^2 grid spanning
     +-``PATCH_EXTENT`` standard deviations around its alpha-weighted centroid, per axis. Whitening removes
     position and scale. Blur softens a shape without changing what it is, so every shape has references
     at several blur levels (``BLUR_LEVELS``, sigma as a fraction of the box half-height), made the same
     way from a high-resolution render. The best reference by soft IoU (sum min / sum max) gives the shape
     if that IoU is at least ``MIN_SHAPE_SCORE`` and the component's sigma_x / sigma_y is within
     ``MAX_ASPECT`` of the reference's; otherwise the shape is unknown (None): a bar, a ring, a smear.
  6. Position: the centre of the component's bounding box (GenEval uses box centres too).

Scores (``score_objects``), each in [0, 1], for a prompt with groups g = (n_g, colour c_g, shape s_g):
  count     partial credit over G groups plus one "nothing else" slot:
            (sum_g 1[m_g = n_g] + 1[u = 0]) / (G + 1), where m_g = detected objects of colour c_g AND shape
            s_g, and u = detected objects that match no group's (colour, shape).
  colour    fraction of requested objects whose colour is present: sum_c min(req_c, det_c) / sum_g n_g,
            with req_c requested and det_c detected objects of colour c (any shape).
  shape     the same with shapes: sum_s min(req_s, det_s) / sum_g n_g.
  position  prompts with a relation: 1 if both groups are detected (>= 1 object of the exact colour and
            shape each) and the offset between the two groups' mean box centres points along the relation's
            axis: along > ``MIN_RELATION_OFFSET`` (5% of the image) and within 60 deg of the axis (along >=
            0.5 |offset|, GenEval's rule), else 0. Prompts without a relation are N/A and score 1.0 so they
            never fail ``overall``; ``ShapesEvalResult.has_relation`` marks which prompts the value is real
            for, so position can be averaged over relation prompts only.
  overall   binary, like GenEval: 1 iff count, colour, shape and position are all 1 (exact counts of the
            exact colour+shape per group, nothing else in the image, relation satisfied).
Objects of a colour far from the palette (black, white, grey) are not detected, so they neither satisfy
nor spoil a prompt.

Figures (``python -m shapes.bench_eval``, 1000 test renders): overall 1.000 clean, 1.000 blur (sigma 1 px),
1.000 noise (sigma 0.05), 0.99 JPEG q40, 0.99 all three; shuffled captions 0.007 = the chance level; captions
with one attribute changed 0.000; ~500 images per CPU-second. The residual errors are small (r = 7 px)
yellow or orange stars after JPEG: 4:2:0 chroma subsampling blurs the colours that differ from the light
background mostly in chroma.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from shapes.data import (COLORS, SHAPE_ASPECT, SHAPES, PromptSpec, coverage, parse_caption, relation_axis,
                         spec_kind)

REFERENCE_SIZE = 64  # the pixel constants below are for a 64^2 image and scale with min(H, W) / 64
SMOOTH_SIGMA = 0.6  # px
MAX_RESIDUAL = 0.25  # RGB distance in [0, 1] units from the nearest background-to-palette segment
MIN_ALPHA = 0.5
MIN_AREA = 30  # px; the smallest rendered objects (r = 7 px star or triangle) have ~90 px
PAD = 3  # px of context around a component's box for its soft mask
ALPHA_LO, ALPHA_HI = 0.15, 0.85  # soft-mask remap: below LO is background noise, above HI is inside
PATCH_SIZE = 12
PATCH_EXTENT = 2.8  # standard deviations; the farthest shape point (triangle apex) is 2.83 sd from its centroid
BLUR_LEVELS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # reference blur sigma / box half-height
REFERENCE_HALF_HEIGHT = 24  # px, resolution of the reference renders
REFERENCE_SUPERSAMPLE = 4
MIN_SHAPE_SCORE = 0.75
MAX_ASPECT = 1.5  # allowed ratio between a component's sigma_x / sigma_y and its reference's, either way
MIN_RELATION_OFFSET = 0.05  # of the image size
MIN_RELATION_COS = 0.5  # along >= cos(60 deg) * |offset|: GenEval's rule

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32) / 255.0  # (K, 3)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
CRITERIA = ("count", "color", "shape", "position", "overall")


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image. ``shape`` is None when no shape reference fits."""

    color: str
    shape: str | None
    cx: float  # bounding-box centre, pixels (x right, y down; pixel (i, j) covers [j, j+1) x [i, i+1))
    cy: float
    area: int  # pixels of the hard mask
    shape_score: float  # soft IoU with the best reference


def _soft(alpha: np.ndarray) -> np.ndarray:
    return np.clip((alpha - ALPHA_LO) / (ALPHA_HI - ALPHA_LO), 0.0, 1.0)


_GRID = np.linspace(-PATCH_EXTENT, PATCH_EXTENT, PATCH_SIZE)


def _whitened_patch(soft: np.ndarray) -> tuple[np.ndarray, float]:
    """Resample a soft mask (h, w) on the whitened grid.

    Returns:
        patch (PATCH_SIZE ** 2,) and the aspect sigma_x / sigma_y.
    """
    height, width = soft.shape
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    mass, col_mass, row_mass = soft.sum(), soft.sum(axis=0), soft.sum(axis=1)  # (), (w,), (h,)
    x_mean, y_mean = col_mass @ xs / mass, row_mass @ ys / mass
    sd_x = math.sqrt(col_mass @ (xs - x_mean) ** 2 / mass)
    sd_y = math.sqrt(row_mass @ (ys - y_mean) ** 2 / mass)
    # array index = coordinate - 0.5 (pixel centres)
    cols = x_mean - 0.5 + sd_x * _GRID[None, :]  # (1, G)
    rows = y_mean - 0.5 + sd_y * _GRID[:, None]  # (G, 1)
    rows, cols = np.broadcast_arrays(rows, cols)
    patch = ndimage.map_coordinates(soft, [rows.ravel(), cols.ravel()], order=1, mode="constant", cval=0.0)
    return patch, sd_x / max(sd_y, 1e-6)


@functools.cache
def _references() -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """Reference patches of every shape at every blur level.

    Returns:
        patches (S * len(BLUR_LEVELS), PATCH_SIZE ** 2), their shape names, their sigma_x / sigma_y.
    """
    half_h = REFERENCE_HALF_HEIGHT
    side = 6 * half_h  # room for the blur tails
    patches, names, aspects = [], [], []
    for shape in SHAPES:
        half_w = half_h * SHAPE_ASPECT[shape]
        sharp = coverage(shape, side / 2, side / 2, half_w, half_h, slice(0, side), slice(0, side), REFERENCE_SUPERSAMPLE)
        for level in BLUR_LEVELS:
            alpha = ndimage.gaussian_filter(sharp, level * half_h, mode="constant") if level > 0 else sharp
            patch, aspect = _whitened_patch(_soft(alpha))
            patches.append(patch)
            names.append(shape)
            aspects.append(aspect)
    return np.stack(patches), tuple(names), np.array(aspects)


def _classify_shape(soft: np.ndarray) -> tuple[str | None, float]:
    """Shape of a component's soft mask (h, w), or None, and the best reference's soft IoU."""
    patch, aspect = _whitened_patch(soft)
    references, names, ref_aspects = _references()
    score = np.minimum(references, patch).sum(axis=1) / np.maximum(references, patch).sum(axis=1)
    best = int(np.argmax(score))
    ratio = aspect / ref_aspects[best]
    if score[best] < MIN_SHAPE_SCORE or not 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        return None, float(score[best])
    return names[best], float(score[best])


def _as_float_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be uint8 (0..255) or float (0..1), got {image.dtype}")
    if not np.isfinite(image).all():
        raise ValueError("image has non-finite pixels (NaN / inf): a diverged sample has no objects to check")
    if image.min() < -0.01 or image.max() > 1.01:
        raise ValueError(f"a float image must be in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
    return image.astype(np.float32, copy=False)


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """Find the objects in an (H, W, 3) image, uint8 in 0..255 or float in [0, 1] (module docstring)."""
    rgb = _as_float_image(image)
    height, width = rgb.shape[:2]
    scale = min(height, width) / REFERENCE_SIZE
    rgb = ndimage.gaussian_filter(rgb, sigma=(SMOOTH_SIGMA * scale, SMOOTH_SIGMA * scale, 0), mode="nearest")
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (P, 3)
    background = np.median(border, axis=0)  # (3,)

    # 3. unmix every pixel against every background -> palette segment
    direction = _PALETTE - background  # (K, 3)
    diff = rgb.reshape(-1, 3) - background  # (N, 3)
    proj = diff @ direction.T  # (N, K)
    length2 = np.sum(direction**2, axis=1)  # (K,)
    alpha = np.clip(proj / length2, 0.0, 1.0)  # (N, K)
    residual2 = np.sum(diff**2, axis=1, keepdims=True) - 2 * alpha * proj + alpha**2 * length2  # (N, K)
    label = np.argmin(residual2, axis=1)  # (N,)
    pixels = np.arange(label.size)
    foreground = (alpha[pixels, label] > MIN_ALPHA) & (residual2[pixels, label] < MAX_RESIDUAL**2)
    label = np.where(foreground, label, -1).reshape(height, width)
    alpha = alpha.reshape(height, width, -1)

    # 4-6. components per colour
    min_area, pad = MIN_AREA * scale**2, round(PAD * scale)
    objects = []
    for k in np.flatnonzero(np.bincount(label[label >= 0], minlength=len(_COLOR_NAMES))):
        components, _ = ndimage.label(label == k, structure=_EIGHT_CONNECTED)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            r0, r1 = max(0, box[0].start - pad), min(height, box[0].stop + pad)
            c0, c1 = max(0, box[1].start - pad), min(width, box[1].stop + pad)
            mask = components[r0:r1, c0:c1] == index  # (h, w)
            area = int(mask.sum())
            if area < min_area:
                continue
            own = mask | (label[r0:r1, c0:c1] < 0)  # this component and the unlabelled pixels around it
            shape, score = _classify_shape(_soft(alpha[r0:r1, c0:c1, k]) * own)
            cy = (box[0].start + box[0].stop) / 2
            cx = (box[1].start + box[1].stop) / 2
            objects.append(DetectedObject(_COLOR_NAMES[k], shape, cx, cy, area, score))
    return objects


def score_objects(objects: Sequence[DetectedObject], spec: PromptSpec, size: int = REFERENCE_SIZE) -> dict[str, float]:
    """Score a list of objects against ``spec`` (criteria in the module docstring); ``size`` = min(H, W)."""
    pairs = Counter((o.color, o.shape) for o in objects)
    matched = [pairs[(g.color, g.shape)] for g in spec.groups]
    unrequested = len(objects) - sum(matched)
    count = (sum(m == g.count for m, g in zip(matched, spec.groups)) + (unrequested == 0)) / (len(spec.groups) + 1)

    requested = sum(g.count for g in spec.groups)
    colors, shapes = Counter(o.color for o in objects), Counter(o.shape for o in objects)
    req_colors, req_shapes = Counter(), Counter()
    for g in spec.groups:
        req_colors[g.color] += g.count
        req_shapes[g.shape] += g.count
    color = sum(min(n, colors[c]) for c, n in req_colors.items()) / requested
    shape = sum(min(n, shapes[s]) for s, n in req_shapes.items()) / requested

    position = 1.0
    if spec.relation is not None:
        position = 0.0
        centres = []
        for g in spec.groups:
            members = [(o.cx, o.cy) for o in objects if (o.color, o.shape) == (g.color, g.shape)]
            centres.append(np.mean(members, axis=0) if members else None)
        if centres[0] is not None and centres[1] is not None:
            offset = centres[0] - centres[1]
            along = float(offset @ np.array(relation_axis(spec.relation)))
            if along > MIN_RELATION_OFFSET * size and along >= MIN_RELATION_COS * float(np.linalg.norm(offset)):
                position = 1.0

    overall = float(count == 1.0 and color == 1.0 and shape == 1.0 and position == 1.0)
    return {"count": count, "color": color, "shape": shape, "position": position, "overall": overall}


def score_image(image: np.ndarray, spec: PromptSpec) -> dict[str, float]:
    """Score an (H, W, 3) image (uint8 0..255 or float 0..1) against ``spec``.

    Returns:
        {"count", "color", "shape", "position", "overall"} -> float in [0, 1].
    """
    return score_objects(detect_objects(image), spec, size=min(image.shape[:2]))


@dataclass
class ShapesEvalResult:
    """Per-image scores, each (B,) float32 in [0, 1] on the images' device (definitions: module docstring).

    ``has_relation`` (B,) bool marks the prompts whose ``position`` is a real check (it is 1.0, N/A, else).
    ``overall_single`` / ``overall_two`` are ``overall`` on one-group / two-group prompts and NaN on the others, so a
    NaN-ignoring mean (rl.common.evaluate's) gives the score of each part: a validation set and an evaluation set
    that mix the kinds differently compare part by part.
    """

    count: Tensor
    color: Tensor
    shape: Tensor
    position: Tensor
    overall: Tensor
    has_relation: Tensor
    overall_single: Tensor | None = None
    overall_two: Tensor | None = None


@functools.lru_cache(maxsize=65536)
def _parse(prompt: str) -> PromptSpec:
    return parse_caption(prompt)


def _score_rows(pixels: np.ndarray, specs: list[PromptSpec]) -> list[dict[str, float]]:
    """``score_image`` over a chunk (module level: what a worker process runs)."""
    return [score_image(image, spec) for image, spec in zip(pixels, specs)]


class ShapesEval:
    """Pixel checker: ``ShapesEval()(images (B, 3, H, W) in [0, 1], prompts) -> ShapesEvalResult``.

    Prompts must be Shapes captions (``shapes.data.caption``); anything else, the empty unconditional prompt
    included, raises ValueError.

    ``workers`` > 0 scores the images in that many worker processes (chunks in order; the scores are the same,
    image by image). At ~2 ms per image on one core the checker, not the sampler, is most of a GPU run's
    evaluation time (2858 validation + 512 held-out prompts: 7.7 s per evaluation on an H100 host, a third of
    an 8.5-minute run's wall-clock). The pool starts at the first call (forked, as DataLoader workers are: the
    workers run numpy/scipy only, never CUDA) and lasts as long as the evaluator.
    """

    def __init__(self, workers: int = 0) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0: score in this process), got {workers}")
        self.workers = workers
        self._pool = None

    def __call__(self, images: Tensor, prompts: list[str]) -> ShapesEvalResult:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        specs = [_parse(p) for p in prompts]
        # a sample with non-finite pixels (a diverged policy) scores NaN on every criterion, the signal trainers
        # skip as a non-finite reward, rather than the partial credit an empty canvas would get
        finite = torch.isfinite(images.detach()).flatten(1).all(1).cpu()
        pixels = images.detach().float().nan_to_num(0.0, 0.0, 0.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
        rows = self._score(pixels, specs)
        columns = {k: torch.tensor([r[k] if ok else math.nan for r, ok in zip(rows, finite.tolist())],
                                   dtype=torch.float32, device=images.device) for k in CRITERIA}
        has_relation = torch.tensor([s.relation is not None for s in specs], dtype=torch.bool, device=images.device)
        single = torch.tensor([spec_kind(s) == "single" for s in specs], dtype=torch.bool, device=images.device)
        nan = torch.full_like(columns["overall"], math.nan)
        return ShapesEvalResult(**columns, has_relation=has_relation,
                                overall_single=torch.where(single, columns["overall"], nan),
                                overall_two=torch.where(single, nan, columns["overall"]))

    def _score(self, pixels: np.ndarray, specs: list[PromptSpec]) -> list[dict[str, float]]:
        chunks = min(self.workers, len(specs) // 16)  # below ~16 images per worker the hand-off costs more
        if chunks < 2:
            return _score_rows(pixels, specs)
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        bounds = np.linspace(0, len(specs), chunks + 1).astype(int)
        futures = [self._pool.submit(_score_rows, pixels[a:b], specs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return [row for f in futures for row in f.result()]

    def __getstate__(self) -> dict:  # a pool does not pickle; a copy starts its own
        return {**self.__dict__, "_pool": None}

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
