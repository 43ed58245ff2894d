"""The Shapes world: procedural scenes, their captions, a caption parser, train/test splits, a torch dataset.

A scene is one or two *groups* of identical objects ("two blue squares"), optionally related by a spatial
relation ("a red circle to the left of two blue squares"). Everything is a pure function of a
``np.random.Generator`` (or of a seed), so a (seed, index) pair names one image for good.

Grammar of a caption (``caption`` writes it, ``parse_caption`` reads it back)::

    caption  := [prefix] group [(conjunction | relation) group]
    group    := number colour shape            (shape plural when number > 1)
    number   := a | an | one | two | three | four      ("an" before a vowel, "a" otherwise)
    prefix   := a photo of | an image of | a picture of | a drawing of
    conjunction := and | with
    relation := to the left of | left of | on the left of | to the right of | right of | on the right of
              | above | over | below | under | beneath

The canonical phrasing (``caption(spec)`` without an rng) uses no prefix, the article for one, "and", and
the first phrase of each relation ("to the left of", "to the right of", "above", "below").

Geometry. Pixel (row i, column j) covers [j, j+1) x [i, i+1); x grows to the right, y downwards. Every
shape is defined inside its axis-aligned bounding box (``shape_mask``); an object is placed by its box
centre (cx, cy) and half extents (hx, hy), with hy = r ("radius", 7-14 px at 64^2) and hx = r * aspect.
The same unit-box definitions are used by the checker (shapes/eval.py) to build its shape templates.

Splits. ``HELD_OUT_PAIRS`` (5 of the 30 colour-shape pairs, 17%; every shape once, five colours once) never
appear in a train spec; every test spec contains at least one, so the test split measures compositional
generalisation (each colour and each shape is still seen in training, only not in that combination).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (245, 215, 30),
    "purple": (145, 60, 195),
    "orange": (250, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_COUNT = 4
SPLITS: tuple[str, ...] = ("train", "test")

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "square"), ("purple", "diamond")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
TEST_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in HELD_OUT_PAIRS)

# ---------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` identical objects of one colour and shape."""

    count: int
    color: str
    shape: str

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be in 1..{MAX_COUNT}, got {self.count}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; valid: {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid: {list(SHAPES)}")


@dataclass(frozen=True)
class PromptSpec:
    """One or two groups; ``relation`` (if any) says where groups[0] is relative to groups[1]."""

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))  # a list would make the spec unhashable
        if len(self.groups) not in (1, 2):
            raise ValueError(f"a spec has 1 or 2 groups, got {len(self.groups)}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; valid: {list(RELATIONS)}")
            if len(self.groups) != 2:
                raise ValueError("a relation needs exactly 2 groups")
        if len(self.groups) == 2 and _pair(self.groups[0]) == _pair(self.groups[1]):
            raise ValueError(f"the two groups must differ in colour or shape, both are {_pair(self.groups[0])}")

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) pair of each group."""
        return tuple(_pair(g) for g in self.groups)


def _pair(group: ObjectGroup) -> tuple[str, str]:
    return (group.color, group.shape)


# Probabilities of the three prompt kinds and of the counts (documented in sample_spec).
KIND_PROBS = {"single": 0.4, "pair": 0.2, "relation": 0.4}
SINGLE_COUNT_PROBS = {1: 0.4, 2: 0.2, 3: 0.2, 4: 0.2}
GROUP_COUNT_PROBS = {1: 0.6, 2: 0.25, 3: 0.15}  # per group when there are two groups (<= 6 objects)


def _choice(rng: np.random.Generator, probs: dict):
    """A key of ``probs`` drawn with the probabilities given as its values."""
    keys = list(probs)
    return keys[rng.choice(len(keys), p=np.array(list(probs.values())))]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_spec(rng: np.random.Generator, split: str) -> PromptSpec:
    """Draw a prompt spec of ``split``.

    Kinds: one group (40%, count 1/2/3/4 with p 0.4/0.2/0.2/0.2), two groups joined by a conjunction (20%) and two
    groups with a relation (40%); with two groups each count is 1/2/3 with p 0.6/0.25/0.15 and the groups
    differ in (colour, shape). Train specs use only ``TRAIN_PAIRS``; in a test spec one group (chosen
    uniformly) is a held-out pair and the other group is any other pair.
    """
    _check_split(split)
    kind = _choice(rng, KIND_PROBS)
    n_groups = 1 if kind == "single" else 2
    count_probs = SINGLE_COUNT_PROBS if n_groups == 1 else GROUP_COUNT_PROBS
    counts = [int(_choice(rng, count_probs)) for _ in range(n_groups)]
    if split == "train":
        idx = rng.choice(len(TRAIN_PAIRS), size=n_groups, replace=False)
        pairs = [TRAIN_PAIRS[i] for i in idx]
    else:
        held = TEST_PAIRS[rng.integers(len(TEST_PAIRS))]
        others = [p for p in ALL_PAIRS if p != held]
        pairs = [held] + ([others[rng.integers(len(others))]] if n_groups == 2 else [])
        if n_groups == 2 and rng.random() < 0.5:
            pairs.reverse()
    relation = RELATIONS[rng.integers(len(RELATIONS))] if kind == "relation" else None
    groups = tuple(ObjectGroup(n, c, s) for n, (c, s) in zip(counts, pairs))
    return PromptSpec(groups, relation)


def in_split(spec: PromptSpec, split: str) -> bool:
    """Train: no group is a held-out pair. Test: at least one group is."""
    _check_split(split)
    held = any(p in HELD_OUT_PAIRS for p in spec.pairs())
    return held if split == "test" else not held


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
PREFIXES: tuple[str, ...] = ("", "a photo of", "an image of", "a picture of", "a drawing of")
CONJUNCTIONS: tuple[str, ...] = ("and", "with")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_VOWELS = "aeiou"


def _article(word: str) -> str:
    return "an" if word[0] in _VOWELS else "a"


def _group_phrase(group: ObjectGroup, rng: np.random.Generator | None) -> str:
    if group.count == 1:
        number = "one" if rng is not None and rng.random() < 0.3 else _article(group.color)
        return f"{number} {group.color} {group.shape}"
    return f"{NUMBER_WORDS[group.count]} {group.color} {group.shape}s"


def caption(spec: PromptSpec, rng: np.random.Generator | None = None) -> str:
    """Plain-English caption of ``spec``; with ``rng`` the phrasing varies (prefix, "one"/"a", conjunction,
    relation phrase), without it the canonical phrasing is used. ``parse_caption`` inverts every phrasing."""
    parts = []
    if rng is not None:
        prefix = PREFIXES[rng.integers(len(PREFIXES))]
        if prefix:
            parts.append(prefix)
    parts.append(_group_phrase(spec.groups[0], rng))
    if len(spec.groups) == 2:
        if spec.relation is None:
            options = CONJUNCTIONS
        else:
            options = RELATION_PHRASES[spec.relation]
        parts.append(options[rng.integers(len(options))] if rng is not None else options[0])
        parts.append(_group_phrase(spec.groups[1], rng))
    return " ".join(parts)


_RELATION_BY_PHRASE: dict[tuple[str, ...], str] = {
    tuple(p.split()): rel for rel, phrases in RELATION_PHRASES.items() for p in phrases
}
_CONJUNCTION_WORDS = frozenset(CONJUNCTIONS)
_PREFIX_TOKENS = tuple(tuple(p.split()) for p in PREFIXES if p)
_COUNT_BY_WORD = {"a": 1, "an": 1, "one": 1, **{w: n for n, w in NUMBER_WORDS.items()}}


def _match_phrase(tokens: list[str], pos: int, phrases: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    """Longest phrase (a token tuple) of ``phrases`` that starts at ``tokens[pos]``."""
    best = None
    for phrase in phrases:
        if tuple(tokens[pos : pos + len(phrase)]) == phrase and (best is None or len(phrase) > len(best)):
            best = phrase
    return best


def _parse_error(text: str, what: str) -> ValueError:
    return ValueError(f"cannot parse caption {text!r}: {what}")


def _parse_group(tokens: list[str], pos: int, text: str) -> tuple[ObjectGroup, int]:
    """Read '<number> <colour> <shape>' at ``tokens[pos]``; returns the group and the next position."""
    if pos + 3 > len(tokens):
        raise _parse_error(text, f"expected '<number> <colour> <shape>' at {' '.join(tokens[pos:])!r}")
    number, color, shape = tokens[pos : pos + 3]
    if number not in _COUNT_BY_WORD:
        raise _parse_error(text, f"unknown number word {number!r} (valid: {sorted(_COUNT_BY_WORD)})")
    if color not in COLORS:
        raise _parse_error(text, f"unknown colour {color!r} (valid: {sorted(COLORS)})")
    count = _COUNT_BY_WORD[number]
    if number in ("a", "an") and number != _article(color):
        raise _parse_error(text, f"article {number!r} does not agree with {color!r}")
    singular = shape[:-1] if count > 1 and shape.endswith("s") else shape
    if singular not in SHAPES:
        raise _parse_error(text, f"unknown shape {shape!r} (valid: {list(SHAPES)}, plural with counts > 1)")
    if count > 1 and singular == shape:
        raise _parse_error(text, f"count {number!r} needs the plural {shape + 's'!r}")
    return ObjectGroup(count, color, singular), pos + 3


def parse_caption(text: str) -> PromptSpec:
    """Read a caption written by ``caption`` (any phrasing) back into its spec.

    Case and runs of whitespace are ignored. Raises ValueError naming the part that does not parse.
    """
    tokens = text.lower().split()
    if not tokens:
        raise _parse_error(text, "it is empty")
    pos = 0
    prefix = _match_phrase(tokens, 0, _PREFIX_TOKENS)
    if prefix is not None:
        pos = len(prefix)
    first, pos = _parse_group(tokens, pos, text)
    if pos == len(tokens):
        return PromptSpec((first,), None)
    relation = None
    phrase = _match_phrase(tokens, pos, _RELATION_BY_PHRASE)
    if phrase is not None:
        relation = _RELATION_BY_PHRASE[phrase]
        pos += len(phrase)
    elif tokens[pos] in _CONJUNCTION_WORDS:
        pos += 1
    else:
        raise _parse_error(
            text, f"expected a conjunction {list(CONJUNCTIONS)} or a relation phrase at {' '.join(tokens[pos:])!r}"
        )
    second, pos = _parse_group(tokens, pos, text)
    if pos != len(tokens):
        raise _parse_error(text, f"unexpected trailing words {' '.join(tokens[pos:])!r}")
    try:
        return PromptSpec((first, second), relation)
    except ValueError as err:
        raise _parse_error(text, str(err)) from None


def vocabulary() -> list[str]:
    """Every word any caption can contain, lower-case and sorted."""
    words = set(_COUNT_BY_WORD) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
    words |= set(CONJUNCTIONS)
    for phrase in (*PREFIXES, *(p for ps in RELATION_PHRASES.values() for p in ps)):
        words.update(phrase.split())
    return sorted(words)


_PROMPT_STREAM = 1  # keeps prompts(seed) and ShapesDataset(seed) on different random streams
_DATASET_STREAM = 0
_MIXTURE_STREAM = 2  # the split draw of ShapesMixture, independent of the scenes it then renders
_MISMATCH_STREAM = 3  # ShapesDataset(mismatch=...): whether and how item i's image departs from its caption


def spec_kind(spec: PromptSpec) -> str:
    """Which of ``KIND_PROBS``'s kinds ``spec`` is: one group, two joined by a conjunction, or two with a relation."""
    if len(spec.groups) == 1:
        return "single"
    return "pair" if spec.relation is None else "relation"


def prompts(split: str, n: int, seed: int, kinds: list[str] | None = None) -> list[str]:
    """``n`` canonical captions of ``split`` specs, a pure function of (split, n, seed, kinds); the first k
    prompts of a longer list equal ``prompts(split, k, seed, kinds)``.

    ``kinds`` (a subset of ``KIND_PROBS``) keeps only prompts of those kinds: specs are drawn as without it and
    the others skipped, so ``prompts(split, n, seed, kinds)`` is the kinds' subsequence of the unfiltered stream.
    """
    _check_split(split)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n (how many prompts) must be a whole number >= 0, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    if kinds is not None:
        bad = [k for k in kinds if k not in KIND_PROBS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty list of prompt kinds {list(KIND_PROBS)}, got {kinds!r}")
    rng = np.random.default_rng((seed, SPLITS.index(split), _PROMPT_STREAM))
    out: list[str] = []
    while len(out) < n:
        spec = sample_spec(rng, split)
        if kinds is None or spec_kind(spec) in kinds:
            out.append(caption(spec))
    return out


def prompt_union(parts: list[list[str]]) -> list[str]:
    """The prompt lists ``parts`` one after another (duplicates kept: a prompt drawn twice weighs twice), for a
    config node that combines prompt sets, e.g. validation prompts from two splits (configs/experiments/keep_best.yaml)."""
    return [p for part in parts for p in part]


# ---------------------------------------------------------------------------------------------------------
# Geometry and rendering
# ---------------------------------------------------------------------------------------------------------

STAR_INNER_RATIO = 0.5  # fatter than the regular {5/2} star (0.382) so the arms survive blur at 64^2
_STAR_ANGLES = -math.pi / 2 + np.arange(11) * math.pi / 5
_STAR_RADII = np.where(np.arange(11) % 2 == 0, 1.0, STAR_INNER_RATIO)
_STAR_VERTS = np.stack([_STAR_RADII * np.cos(_STAR_ANGLES), _STAR_RADII * np.sin(_STAR_ANGLES)], axis=1)  # (11, 2)
_STAR_X_HALF = float(np.cos(math.radians(18)))  # 0.951, half width of the unit-radius star
_STAR_Y_RANGE = (-1.0, float(np.cos(math.radians(36))))  # tip up, bottom tips at y = 0.809

SHAPE_ASPECT: dict[str, float] = {  # bounding-box width / height
    "circle": 1.0,
    "square": 1.0,
    "triangle": 1.0,
    "diamond": 1.0,
    "star": 2 * _STAR_X_HALF / (_STAR_Y_RANGE[1] - _STAR_Y_RANGE[0]),
}


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) of the unit bounding box [0, 1]^2 (v downwards) lie inside ``shape``.

    The shape fills its box: an inscribed circle, the full square, an upward isosceles triangle with base =
    height, a diamond through the edge midpoints, a five-pointed star (tip up) touching all four sides.
    u and v broadcast against each other.
    """
    inside_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    du, dv = u - 0.5, v - 0.5
    if shape == "circle":
        return du * du + dv * dv <= 0.25
    if shape == "square":
        return inside_box
    if shape == "triangle":
        return inside_box & (np.abs(du) <= v / 2)
    if shape == "diamond":
        return np.abs(du) + np.abs(dv) <= 0.5
    if shape == "star":
        x = du * (2 * _STAR_X_HALF)
        y = _STAR_Y_RANGE[0] + v * (_STAR_Y_RANGE[1] - _STAR_Y_RANGE[0])
        theta = np.arctan2(y, x)
        k = np.floor(((theta - _STAR_ANGLES[0]) % (2 * math.pi)) / (math.pi / 5)).astype(np.int64) % 10
        a, b = _STAR_VERTS[k], _STAR_VERTS[k + 1]  # edge of the sector the ray points into
        e = b - a
        # The star is star-shaped about its centre: p = rho * d is inside iff rho <= t, where the ray t * d
        # meets the edge at t = cross(a, e) / cross(d, e). cross(d, e) > 0 (the vertices go round with
        # increasing angle), so rho <= t  <=>  cross(p, e) <= cross(a, e).
        cross_ae = a[..., 0] * e[..., 1] - a[..., 1] * e[..., 0]
        cross_pe = x * e[..., 1] - y * e[..., 0]
        return cross_pe <= cross_ae
    raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")


def coverage(shape: str, cx: float, cy: float, hx: float, hy: float, rows: slice, cols: slice, ss: int) -> np.ndarray:
    """Fraction of each pixel in ``rows`` x ``cols`` covered by the shape, from ss x ss samples per pixel.

    Returns:
        (len(rows), len(cols)) float32 in [0, 1].
    """
    offs = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(cols.start, cols.stop)[:, None] + offs).ravel()  # (W * ss,)
    ys = (np.arange(rows.start, rows.stop)[:, None] + offs).ravel()  # (H * ss,)
    u = (xs - (cx - hx)) / (2 * hx)
    v = (ys - (cy - hy)) / (2 * hy)
    inside = shape_mask(shape, u[None, :], v[:, None])  # (H * ss, W * ss)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)


@dataclass(frozen=True)
class PlacedObject:
    """One object of a rendered scene (generator metadata; the checker never reads it)."""

    group: int
    color: str
    shape: str
    cx: float  # bounding-box centre, pixels
    cy: float
    hx: float  # bounding-box half extents, pixels
    hy: float
    rgb: tuple[int, int, int]  # fill colour after jitter


# Scene constants, as fractions of the image size (64 px in the comments).
RADIUS_MIN = 7 / 64  # below ~7 px, JPEG at quality 40 erases what tells a star from a circle
RADIUS_MAX = 14 / 64
RADIUS_CROWD = 0.22  # r_max for n objects = RADIUS_CROWD * size / sqrt(n): 14 px for 1, 10 for 2, 7 for >= 4
GAP = 4 / 64  # min free space between boxes: same-colour neighbours stay apart after blur + JPEG
MARGIN = 2 / 64  # min distance of a box from the canvas border
RELATION_MAX_ANGLE = 45.0  # generator: group-centre offset within 45 deg of the axis (the checker allows 60)
COLOR_JITTER = 12  # per-channel uniform jitter of an object's fill, in 0..255 levels
SUPERSAMPLE = 4
LAYOUT_ATTEMPTS = 200  # per round; each failed round shrinks the radii by SHRINK (only crowded specs that
LAYOUT_ROUNDS = 10  # sample_spec never draws, e.g. 4 + 4 objects with a relation, need it)
SHRINK = 0.9
MAX_PLACEMENT_TRIES = 60

_AXIS = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


def relation_axis(relation: str) -> tuple[float, float]:
    """Unit vector (x, y) pointing from groups[1] towards where groups[0] must be (y downwards)."""
    return _AXIS[relation]


def _boxes_apart(a: PlacedObject, b: PlacedObject, gap: float) -> bool:
    return abs(a.cx - b.cx) >= a.hx + b.hx + gap or abs(a.cy - b.cy) >= a.hy + b.hy + gap


def _try_layout(spec: PromptSpec, rng: np.random.Generator, size: int, shrink: float) -> list[PlacedObject] | None:
    """One rejection-sampling attempt (``sample_layout``) with radii scaled by ``shrink``; None on failure."""
    n_total = sum(g.count for g in spec.groups)
    r_lo = RADIUS_MIN * size
    r_hi = float(np.clip(RADIUS_CROWD * size / math.sqrt(n_total), r_lo, RADIUS_MAX * size))
    r_lo, r_hi = shrink * r_lo, shrink * r_hi
    gap, margin = max(2.0, GAP * size), max(1.0, MARGIN * size)
    # region (x0, x1, y0, y1) that each group's boxes must lie in
    regions = [(margin, size - margin, margin, size - margin)] * len(spec.groups)
    if spec.relation is not None:
        ax, ay = relation_axis(spec.relation)
        n0, n1 = spec.groups[0].count, spec.groups[1].count
        first = 0 if ax + ay < 0 else 1  # the group nearer the origin along the axis
        n_first = n0 if first == 0 else n1
        split = size * (float(np.clip(n_first / (n0 + n1), 0.35, 0.65)) + rng.uniform(-0.05, 0.05))
        near = (margin, split - gap / 2)
        far = (split + gap / 2, size - margin)
        spans = [near, far] if first == 0 else [far, near]  # along the axis, per group
        full = (margin, size - margin)
        regions = [(*span, *full) if ax != 0 else (*full, *span) for span in spans]
    objects: list[PlacedObject] = []
    for gi, group in enumerate(spec.groups):
        x0, x1, y0, y1 = regions[gi]
        base = np.array(COLORS[group.color])
        for _ in range(group.count):
            r = rng.uniform(r_lo, r_hi)
            hy, hx = r, r * SHAPE_ASPECT[group.shape]
            if x1 - x0 < 2 * hx or y1 - y0 < 2 * hy:
                return None
            rgb = tuple(int(c) for c in np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255))
            for _ in range(MAX_PLACEMENT_TRIES):
                cx, cy = rng.uniform(x0 + hx, x1 - hx), rng.uniform(y0 + hy, y1 - hy)
                obj = PlacedObject(gi, group.color, group.shape, cx, cy, hx, hy, rgb)
                if all(_boxes_apart(obj, o, gap) for o in objects):
                    objects.append(obj)
                    break
            else:
                return None
    if spec.relation is not None:
        centres = [np.mean([(o.cx, o.cy) for o in objects if o.group == g], axis=0) for g in (0, 1)]
        offset = centres[0] - centres[1]
        along = float(offset @ np.array(relation_axis(spec.relation)))
        if along < math.cos(math.radians(RELATION_MAX_ANGLE)) * float(np.linalg.norm(offset)):
            return None
    return objects


def sample_layout(spec: PromptSpec, rng: np.random.Generator, size: int = 64) -> tuple[PlacedObject, ...]:
    """Place the objects of ``spec`` by rejection sampling.

    Boxes stay ``MARGIN`` inside the canvas and ``GAP`` apart; r ~ U(7, r_max) px at 64^2 with r_max shrinking
    with the number of objects. With a relation, every box of groups[0] lies on the stated side of a split
    line and every box of groups[1] on the other side, and the offset between the two groups' mean box
    centres is within ``RELATION_MAX_ANGLE`` of the relation's axis.
    """
    for round_ in range(LAYOUT_ROUNDS):
        for _ in range(LAYOUT_ATTEMPTS):
            objects = _try_layout(spec, rng, size, SHRINK**round_)
            if objects is not None:
                return tuple(objects)
    raise RuntimeError(f"could not lay out {caption(spec)!r} on a {size}x{size} canvas")


BACKGROUND_LEVEL = (210.0, 250.0)  # grey level of the (light, neutral) background
BACKGROUND_TINT = 8.0  # per-channel tint, +-levels
TEXTURE_PROBS = {"plain": 0.5, "gradient": 0.25, "noise": 0.25}
GRADIENT_AMPLITUDE = (6.0, 16.0)  # +- levels across the canvas
NOISE_STD = (2.0, 5.0)  # levels


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 background in 0..255: plain, a linear gradient or mild pixel noise."""
    colour = rng.uniform(*BACKGROUND_LEVEL) + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, 3)
    image = np.broadcast_to(colour.astype(np.float32), (size, size, 3)).copy()
    texture = _choice(rng, TEXTURE_PROBS)
    if texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(*GRADIENT_AMPLITUDE)
        t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5  # (size,)
        ramp = math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None]  # (size, size)
        image += (2 * amplitude * ramp)[..., None]
    elif texture == "noise":
        image += rng.normal(0.0, rng.uniform(*NOISE_STD), (size, size, 3)).astype(np.float32)
    return image


def draw(objects: tuple[PlacedObject, ...], background: np.ndarray) -> np.ndarray:
    """Composite antialiased objects over a float (H, W, 3) 0..255 background; returns (H, W, 3) uint8."""
    image = background.astype(np.float32, copy=True)
    height, width = image.shape[:2]
    for o in objects:
        rows = slice(max(0, int(o.cy - o.hy)), min(height, int(math.ceil(o.cy + o.hy))))
        cols = slice(max(0, int(o.cx - o.hx)), min(width, int(math.ceil(o.cx + o.hx))))
        alpha = coverage(o.shape, o.cx, o.cy, o.hx, o.hy, rows, cols, SUPERSAMPLE)[..., None]  # (h, w, 1)
        image[rows, cols] = (1 - alpha) * image[rows, cols] + alpha * np.array(o.rgb, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_with_layout(
    spec: PromptSpec, rng: np.random.Generator, size: int = 64
) -> tuple[np.ndarray, tuple[PlacedObject, ...]]:
    """``render`` that also returns the placed objects (for tests and benchmarks)."""
    objects = sample_layout(spec, rng, size)
    return draw(objects, _background(rng, size)), objects


def render(spec: PromptSpec, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Render ``spec`` as a (size, size, 3) uint8 image."""
    return render_with_layout(spec, rng, size)[0]


# ---------------------------------------------------------------------------------------------------------
# Mismatched scenes: an image that departs from its caption the way a policy's sample does
# ---------------------------------------------------------------------------------------------------------

# How ``mismatched_render`` departs from the caption, with its probability. "drift" keeps the scene and blends one
# group's fill towards another palette colour (a policy asked for an unseen colour-shape pair paints it off-palette,
# e.g. an orange "yellow square"); the others render a spec with one thing changed.
MISMATCH_PROBS = {"drift": 0.3, "color": 0.2, "shape": 0.15, "count": 0.15, "layout": 0.2}
DRIFT_RANGE = (0.25, 0.75)  # blend weight t of the other colour: (1 - t) * own + t * other


def perturb_spec(spec: PromptSpec, kind: str, rng: np.random.Generator,
                 pairs: Sequence[tuple[str, str]] | None = None) -> PromptSpec:
    """``spec`` with one thing changed: a group's colour, shape or count, or (``layout``) the relation flipped, a
    group dropped, or (one group) a second group added. Always a valid spec that differs from ``spec``. ``pairs``:
    the colour-shape pairs a changed colour or shape may make (train images: the train pairs); None: any. The
    ``drift`` kind of :func:`mismatched_render` blends a fill towards another colour and is not restricted: ~8 % of
    train-split drift renders read as a held-out pair to the checker."""
    groups = list(spec.groups)
    g = int(rng.integers(len(groups)))
    if kind in ("color", "shape"):
        taken = {_pair(h) for h in groups}  # its own pair and the other group's (two groups must differ)
        old = groups[g]
        options = ([ObjectGroup(old.count, c, old.shape) for c in COLORS] if kind == "color"
                   else [ObjectGroup(old.count, old.color, sh) for sh in SHAPES])
        options = [o for o in options if _pair(o) not in taken]  # >= 4 colours / 3 shapes are always left
        if pairs is not None:
            allowed = set(pairs)
            options = [o for o in options if _pair(o) in allowed]
            if not options:
                raise ValueError(f"no {kind} change of {old} keeps to the given colour-shape pairs")
        groups[g] = options[int(rng.integers(len(options)))]
        return PromptSpec(tuple(groups), spec.relation)
    if kind == "count":
        top = MAX_COUNT if len(groups) == 1 else max(GROUP_COUNT_PROBS)
        counts = [n for n in range(1, top + 1) if n != groups[g].count]
        groups[g] = ObjectGroup(int(rng.choice(counts)), groups[g].color, groups[g].shape)
        return PromptSpec(tuple(groups), spec.relation)
    if kind == "layout":
        if len(groups) == 1:  # an extra group the caption does not mention
            pair = TRAIN_PAIRS[int(rng.integers(len(TRAIN_PAIRS)))]
            while pair == _pair(groups[0]):
                pair = TRAIN_PAIRS[int(rng.integers(len(TRAIN_PAIRS)))]
            return PromptSpec((groups[0], ObjectGroup(1, *pair)))
        if spec.relation is not None and rng.random() < 0.5:  # the groups on the wrong sides
            flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            return PromptSpec(tuple(groups), flipped[spec.relation])
        return PromptSpec((groups[g],))  # a group missing
    raise ValueError(f"unknown mismatch kind {kind!r}; valid: {list(MISMATCH_PROBS)}")


def mismatched_render(spec: PromptSpec, rng: np.random.Generator, size: int = 64,
                      pairs: Sequence[tuple[str, str]] | None = None) -> tuple[np.ndarray, str]:
    """A scene that departs from ``spec`` in one way (``MISMATCH_PROBS``); returns the (size, size, 3) uint8 image
    and the kind of departure. ``pairs``: as :func:`perturb_spec`."""
    kind = _choice(rng, MISMATCH_PROBS)
    if kind != "drift":
        return render(perturb_spec(spec, kind, rng, pairs), rng, size), kind
    objects = sample_layout(spec, rng, size)
    g = int(rng.integers(len(spec.groups)))
    own = spec.groups[g].color
    other = np.array(COLORS[str(rng.choice([c for c in COLORS if c != own]))], dtype=np.float64)
    t = rng.uniform(*DRIFT_RANGE)
    objects = tuple(
        replace(o, rgb=tuple(int(c) for c in np.clip(np.rint((1 - t) * np.array(o.rgb) + t * other), 0, 255)))
        if o.group == g else o for o in objects)
    return draw(objects, _background(rng, size)), kind


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------


class ShapesDataset(Dataset):
    """``num_samples`` (image, caption) pairs of ``split``; item i is a pure function of (split, seed, i).

    Items are {"image": float32 (3, size, size) in [0, 1], "caption": str}; captions use varied phrasing.

    ``mismatch`` > 0: that share of the items keep their caption but show a scene that departs from it in one way
    (``mismatched_render``: an off-palette colour, another colour, shape or count, a missing or extra group, the
    relation flipped), drawn from an independent stream, so items that stay matched are the same as with 0. For
    distilling a prompt-conditioned critic: with every caption true to its image, the student can read the image
    embedding off the caption and overrates a policy sample that misses its prompt.
    """

    def __init__(self, split: str, num_samples: int, seed: int, size: int = 64, mismatch: float = 0.0):
        _check_split(split)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if not 0 <= mismatch <= 1:
            raise ValueError(f"mismatch is the share of mismatched items, in [0, 1]; got {mismatch}")
        self.split, self.num_samples, self.seed, self.size = split, num_samples, seed, size
        self.mismatch = float(mismatch)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), _DATASET_STREAM, index))
        spec = sample_spec(rng, self.split)
        text = caption(spec, rng)
        image = render(spec, rng, self.size)  # (H, W, 3) uint8
        if self.mismatch:
            mrng = np.random.default_rng((self.seed, SPLITS.index(self.split), _MISMATCH_STREAM, index))
            if mrng.random() < self.mismatch:
                image, _ = mismatched_render(spec, mrng, self.size, TRAIN_PAIRS if self.split == "train" else None)
        return {"image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0), "caption": text}


class ShapesMixture(Dataset):
    """``num_samples`` pairs drawn from several splits at fixed shares, e.g. ``{"train": 0.7, "test": 0.3}``: the
    Shapes CLIP's own training mix (shapes/train_clip.py renders 70k train- and 30k test-split scenes).

    A critic distilled from that reward should see the reward's whole domain: the held-out colour-shape pairs are
    held out from the *policy's* prompts, not from the images the reward model knows. Item i draws its split from
    (seed, i) and is then item i of ``ShapesDataset(split, num_samples, seed)``, so it is a pure function of
    (splits, seed, i).
    """

    def __init__(self, splits: dict[str, float], num_samples: int, seed: int, size: int = 64, mismatch: float = 0.0):
        if not isinstance(splits, dict) or not splits:
            raise ValueError(f"splits must map split names {SPLITS} to shares, e.g. {{'train': 0.7, 'test': 0.3}}; "
                             f"got {splits!r}")
        for name, share in splits.items():
            _check_split(name)
            if not isinstance(share, (int, float)) or not share > 0:
                raise ValueError(f"the share of split {name!r} must be a number > 0, got {share!r}")
        if abs(sum(splits.values()) - 1.0) > 1e-6:
            raise ValueError(f"the split shares must sum to 1, got {sum(splits.values())} from {splits}")
        self.parts = [ShapesDataset(name, num_samples, seed, size, mismatch) for name in splits]
        self.cumulative = np.cumsum([float(v) for v in splits.values()])
        self.splits, self.num_samples, self.seed, self.size = dict(splits), num_samples, seed, size

    def __len__(self) -> int:
        return self.num_samples

    def split_of(self, index: int) -> str:
        u = np.random.default_rng((self.seed, _MIXTURE_STREAM, index)).random()
        k = min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.parts) - 1)
        return self.parts[k].split

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        name = self.split_of(index)
        return next(p for p in self.parts if p.split == name)[index]
