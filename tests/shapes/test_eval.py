"""Tests for shapes/eval.py (ShapesEval) and the benchmark helpers in shapes/bench_eval.py."""

import numpy as np
import pytest
import torch

from shapes.bench_eval import (
    blur,
    derangement,
    edit_spec,
    ground_truth,
    oracle_row,
    perturbations,
    summarise,
)
from shapes.data import (
    COLORS,
    SHAPE_ASPECT,
    SHAPES,
    ObjectGroup,
    PlacedObject,
    PromptSpec,
    caption,
    draw,
    parse_caption,
    render_with_layout,
    sample_spec,
)
from shapes.eval import DetectedObject, ShapesEval, detect_objects, score_image, score_objects

N_IMAGES = 200
THRESHOLDS = {"clean": 0.97, "blur": 0.90, "noise": 0.90, "jpeg": 0.90, "blur+noise+jpeg": 0.90}


@pytest.fixture(scope="module")
def renders():
    images, captions, layouts = ground_truth(N_IMAGES, seed=123)
    return perturbations(images, seed=124), captions, layouts


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("condition", list(THRESHOLDS))
def test_ground_truth_renders_pass(renders, condition):
    conditions, captions, _ = renders
    result = ShapesEval()(_tensor(conditions[condition]), captions)
    row = summarise(result)
    assert row["overall"] >= THRESHOLDS[condition], row
    assert min(row.values()) >= THRESHOLDS[condition], row
    if condition == "clean":  # relations in clean renders are read correctly from pixels
        assert bool(result.position[result.has_relation].eq(1.0).all())


def test_shuffled_pairs_score_at_chance(renders):
    conditions, captions, layouts = renders
    shuffled = [captions[p] for p in derangement(N_IMAGES, np.random.default_rng(0))]
    row = summarise(ShapesEval()(_tensor(conditions["clean"]), shuffled))
    chance = oracle_row(layouts, shuffled)  # a perfect detector on the same pairs
    assert chance["overall"] <= 0.05
    assert row["overall"] <= chance["overall"] + 0.02
    for k in ("count", "color", "shape"):
        assert row[k] == pytest.approx(chance[k], abs=0.03), k


def test_captions_with_one_wrong_attribute_fail(renders):
    conditions, captions, _ = renders
    rng = np.random.default_rng(1)
    edited = [caption(edit_spec(parse_caption(c), rng)) for c in captions]
    result = ShapesEval()(_tensor(conditions["clean"]), edited)
    assert float(result.overall.mean()) <= 0.01
    # a reversed relation is caught by the position criterion
    specs, edits = [parse_caption(c) for c in captions], [parse_caption(c) for c in edited]
    flipped = [i for i, (a, b) in enumerate(zip(specs, edits)) if a.groups == b.groups and a.relation != b.relation]
    assert len(flipped) > 10
    assert float(result.position[flipped].max()) == 0.0


def _obj(color, shape, cx, cy):
    return DetectedObject(color, shape, cx, cy, area=100, shape_score=1.0)


def test_score_objects_golden_values():
    spec = parse_caption("two red circles and a blue square")
    exact = [_obj("red", "circle", 10, 10), _obj("red", "circle", 30, 10), _obj("blue", "square", 50, 50)]
    assert score_objects(exact, spec) == {"count": 1.0, "color": 1.0, "shape": 1.0, "position": 1.0, "overall": 1.0}
    # an extra green star: both groups right, the "nothing else" slot wrong -> count 2/3
    extra = exact + [_obj("green", "star", 40, 30)]
    assert score_objects(extra, spec) == pytest.approx(
        {"count": 2 / 3, "color": 1.0, "shape": 1.0, "position": 1.0, "overall": 0.0}
    )
    # one red circle drawn as a red diamond: red group has 1 of 2 (wrong), the diamond is unrequested (wrong);
    # colours all present (3/3), shapes: circles 1 of 2 + square 1 of 1 -> 2/3
    wrong_shape = [_obj("red", "circle", 10, 10), _obj("red", "diamond", 30, 10), _obj("blue", "square", 50, 50)]
    assert score_objects(wrong_shape, spec) == pytest.approx(
        {"count": 1 / 3, "color": 1.0, "shape": 2 / 3, "position": 1.0, "overall": 0.0}
    )
    assert score_objects([], spec) == {"count": 1 / 3, "color": 0.0, "shape": 0.0, "position": 1.0, "overall": 0.0}


@pytest.mark.parametrize(
    "offset, holds",
    [
        ((-20.0, 0.0), True),
        ((-10.0, 15.0), True),  # along 10 >= 0.5 * 18.0
        ((-10.0, 20.0), False),  # along 10 < 0.5 * 22.4: more below than left
        ((-3.0, 0.0), False),  # along 3 < 5% of 64 px
        ((20.0, 0.0), False),
    ],
)
def test_left_of_rule_golden(offset, holds):
    spec = parse_caption("a red circle to the left of two blue squares")
    # group 1's mean centre is (40, 30); group 0 sits at that plus the offset
    objects = [
        _obj("blue", "square", 35, 20),
        _obj("blue", "square", 45, 40),
        _obj("red", "circle", 40 + offset[0], 30 + offset[1]),
    ]
    assert score_objects(objects, spec)["position"] == float(holds)
    mirrored = parse_caption("a red circle to the right of two blue squares")
    mirror = [_obj(o.color, o.shape, 80 - o.cx, o.cy) for o in objects]
    assert score_objects(mirror, mirrored)["position"] == float(holds)
    rotated = parse_caption("a red circle above two blue squares")  # (x, y) -> (y, x) maps left to above
    rotation = [_obj(o.color, o.shape, o.cy, o.cx) for o in objects]
    assert score_objects(rotation, rotated)["position"] == float(holds)
    missing = [o for o in objects if o.color == "blue"]
    assert score_objects(missing, spec)["position"] == 0.0


def _scene(objects, background=(235, 235, 235), size=64):
    return draw(tuple(objects), np.full((size, size, 3), background, dtype=np.float32))


def _single(color, shape, r, cx=32.3, cy=31.6):
    return PlacedObject(0, color, shape, cx, cy, r * SHAPE_ASPECT[shape], r, COLORS[color])


@pytest.mark.parametrize("r", [7.0, 10.5, 14.0])
def test_every_colour_and_shape_is_recognised(r):
    for color in COLORS:
        for shape in SHAPES:
            image = _scene([_single(color, shape, r)]).astype(np.float32) / 255
            for variant in (image, blur(image[None])[0]):
                objects = detect_objects(variant)
                assert [(o.color, o.shape) for o in objects] == [(color, shape)], (color, shape, objects)
                assert objects[0].cx == pytest.approx(32.3, abs=1.0) and objects[0].cy == pytest.approx(31.6, abs=1.0)


def test_touching_objects_of_different_colours_are_separated():
    red = PlacedObject(0, "red", "square", 22.0, 32.0, 10.0, 10.0, COLORS["red"])
    blue = PlacedObject(1, "blue", "square", 42.0, 32.0, 10.0, 10.0, COLORS["blue"])  # shares an edge
    image = _scene([red, blue])
    assert sorted((o.color, o.shape) for o in detect_objects(image)) == [("blue", "square"), ("red", "square")]
    assert score_image(image, parse_caption("a red square to the left of a blue square"))["overall"] == 1.0


def test_background_and_noise_contain_no_objects():
    rng = np.random.default_rng(0)
    plain = np.full((64, 64, 3), 0.9, dtype=np.float32)
    noisy = np.clip(plain + rng.normal(0, 0.05, plain.shape), 0, 1).astype(np.float32)
    assert detect_objects(plain) == [] and detect_objects(noisy) == []


def test_non_shapes_have_no_shape():
    image = np.full((64, 64, 3), 235, dtype=np.uint8)
    image[28:34, 8:56] = COLORS["red"]  # a bar (aspect 8)
    yy, xx = np.mgrid[:64, :64] + 0.5
    ring = (np.hypot(xx - 32, yy - 14) < 10) & (np.hypot(xx - 32, yy - 14) > 6)
    image[ring] = COLORS["blue"]
    found = {o.color: o.shape for o in detect_objects(image)}
    assert found == {"red": None, "blue": None}


def test_uint8_and_float_images_agree():
    rng = np.random.default_rng(4)
    for _ in range(10):
        spec = sample_spec(rng, "test")
        image, _ = render_with_layout(spec, rng)
        assert score_image(image, spec) == score_image(image.astype(np.float32) / 255, spec)


def test_bad_image_inputs_fail_loudly():
    spec = parse_caption("a red circle")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        score_image(np.full((64, 64, 3), 200.0, dtype=np.float32), spec)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        score_image(np.zeros((64, 64), dtype=np.uint8), spec)
    with pytest.raises(ValueError, match="uint8"):
        score_image(np.zeros((64, 64, 3), dtype=np.int64), spec)


def test_larger_images():
    images, captions, _ = ground_truth(40, seed=5, size=128)
    assert float(ShapesEval()(_tensor(images), captions).overall.mean()) >= 0.97


def test_worker_processes_score_image_by_image_as_one_process(renders):
    conditions, captions, _ = renders
    shuffled = [captions[p] for p in derangement(N_IMAGES, np.random.default_rng(3))]
    images = _tensor(conditions["blur+noise+jpeg"])
    mixed = captions[:100] + shuffled[100:]  # passes and failures, so a misplaced chunk would show
    serial = ShapesEval()(images, mixed)
    checker = ShapesEval(workers=3)
    for _ in range(2):  # the pool starts at the first call and is reused
        parallel = checker(images, mixed)
        for name in ("count", "color", "shape", "position", "overall", "has_relation"):
            assert torch.equal(getattr(parallel, name), getattr(serial, name)), name
    assert 0.2 < float(serial.overall.mean()) < 0.8
    with pytest.raises(ValueError, match="workers must be >= 0"):
        ShapesEval(workers=-1)


def test_overall_by_prompt_kind(renders):
    conditions, captions, _ = renders
    result = ShapesEval()(_tensor(conditions["noise"]), captions)
    single = torch.tensor([len(parse_caption(c).groups) == 1 for c in captions])
    assert 0 < int(single.sum()) < len(captions)
    assert bool(result.overall_single.isnan().eq(~single).all()) and bool(result.overall_two.isnan().eq(single).all())
    assert torch.equal(result.overall_single[single], result.overall[single])
    assert torch.equal(result.overall_two[~single], result.overall[~single])
    n1 = int(single.sum())  # the NaN-ignoring means recombine into the overall mean
    mixed = (result.overall_single.nanmean() * n1 + result.overall_two.nanmean() * (len(captions) - n1)) / len(captions)
    assert float(mixed) == pytest.approx(float(result.overall.mean()), abs=1e-6)


def test_result_types_and_input_validation():
    images, captions, _ = ground_truth(4, seed=6)
    result = ShapesEval()(_tensor(images), captions)
    for name in ("count", "color", "shape", "position", "overall"):
        value = getattr(result, name)
        assert value.shape == (4,) and value.dtype == torch.float32
        assert bool(((value >= 0) & (value <= 1)).all())
    assert result.has_relation.dtype == torch.bool
    assert result.has_relation.tolist() == [parse_caption(c).relation is not None for c in captions]
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        ShapesEval()(_tensor(images), captions[:3])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ShapesEval()(_tensor(images)[:, :1], captions)
    with pytest.raises(ValueError, match="cannot parse caption 'a red blob'"):
        ShapesEval()(_tensor(images)[:1], ["a red blob"])
    with pytest.raises(ValueError, match="empty"):
        ShapesEval()(_tensor(images)[:1], [""])


def test_edit_spec_changes_exactly_one_attribute():
    rng = np.random.default_rng(8)
    for _ in range(300):
        spec = sample_spec(rng, "test")
        edited = edit_spec(spec, rng)
        changes = int(spec.relation != edited.relation)
        for a, b in zip(spec.groups, edited.groups):
            changes += (a.count != b.count) + (a.color != b.color) + (a.shape != b.shape)
        assert changes == 1
        assert isinstance(edited, PromptSpec) and all(isinstance(g, ObjectGroup) for g in edited.groups)
    for _ in range(20):
        perm = derangement(5, rng)
        assert sorted(perm.tolist()) == list(range(5)) and not np.any(perm == np.arange(5))


def test_a_sample_with_non_finite_pixels_scores_nan_not_partial_credit():
    # an empty canvas earns partial credit (count 0.5 for "a red circle"); a diverged NaN sample must not
    images, prompts, _ = ground_truth(3, seed=5)
    x = _tensor(images).clone()  # float in [0, 1]
    x[1, :, 10:14, 10:14] = float("nan")  # a NaN patch inside an otherwise correct render
    result = ShapesEval()(x, prompts[:3])
    clean = ShapesEval()(_tensor(images), prompts[:3])
    for criterion in ("count", "color", "shape", "position", "overall"):
        got, ref = getattr(result, criterion), getattr(clean, criterion)
        assert torch.isnan(got[1]) and torch.equal(got[[0, 2]], ref[[0, 2]])
    with pytest.raises(ValueError, match="non-finite pixels"):
        detect_objects(np.full((32, 32, 3), np.nan, dtype=np.float32))
