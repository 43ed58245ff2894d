"""Tests for shapes/data.py: determinism, splits, captions and their parser, scene geometry, the dataset."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from shapes.data import (
    COLORS,
    CONJUNCTIONS,
    DRIFT_RANGE,
    HELD_OUT_PAIRS,
    MISMATCH_PROBS,
    PREFIXES,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    TRAIN_PAIRS,
    ObjectGroup,
    PromptSpec,
    ShapesDataset,
    ShapesMixture,
    _choice,
    caption,
    in_split,
    mismatched_render,
    parse_caption,
    perturb_spec,
    prompt_union,
    prompts,
    relation_axis,
    render,
    render_with_layout,
    sample_layout,
    sample_spec,
    spec_kind,
    shape_mask,
    vocabulary,
)

N_SPECS = 2000


def _specs(split: str, n: int = N_SPECS, seed: int = 0) -> list[PromptSpec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, split) for _ in range(n)]


def test_palette_is_well_separated():
    rgb = np.array(list(COLORS.values()), dtype=float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=2) + np.eye(len(rgb)) * 1e9
    assert dist.min() > 75  # orange-yellow is the closest pair (80 levels)
    # backgrounds are light neutral greys (210..250 +-8); every object colour is saturated
    assert all(max(c) - min(c) >= 120 for c in COLORS.values())


@pytest.mark.parametrize(
    "shape, fraction",
    [
        ("circle", math.pi / 4),
        ("square", 1.0),
        ("triangle", 0.5),
        ("diamond", 0.5),
        # 10 triangles of area R * r_in * sin(36 deg) / 2 (R = 1, r_in = 0.5) over a 2 cos18 x (1 + cos36) box
        (
            "star",
            5 * 0.5 * math.sin(math.radians(36)) / (2 * math.cos(math.radians(18)) * (1 + math.cos(math.radians(36)))),
        ),
    ],
)
def test_shape_mask_area_fraction(shape, fraction):
    g = (np.arange(800) + 0.5) / 800
    assert shape_mask(shape, g[None, :], g[:, None]).mean() == pytest.approx(fraction, abs=2e-3)


def test_shape_mask_touches_all_four_box_sides():
    g = (np.arange(400) + 0.5) / 400
    for shape in SHAPES:
        mask = shape_mask(shape, g[None, :], g[:, None])
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        # within two samples (the triangle's apex is a single point)
        assert rows[0] <= 2 and rows[-1] >= 397 and cols[0] <= 2 and cols[-1] >= 397, shape


def test_sample_spec_and_render_are_deterministic():
    for split in ("train", "test"):
        a, b = np.random.default_rng(7), np.random.default_rng(7)
        for _ in range(20):
            spec_a, spec_b = sample_spec(a, split), sample_spec(b, split)
            assert spec_a == spec_b
            assert np.array_equal(render(spec_a, a), render(spec_b, b))
    spec = sample_spec(np.random.default_rng(0), "train")
    assert not np.array_equal(render(spec, np.random.default_rng(1)), render(spec, np.random.default_rng(2)))


def test_held_out_pairs_are_a_documented_fraction_and_leave_every_attribute_in_train():
    n_pairs = len(COLORS) * len(SHAPES)
    assert 0.15 <= len(HELD_OUT_PAIRS) / n_pairs <= 0.2
    assert {c for c, _ in TRAIN_PAIRS} == set(COLORS)
    assert {s for _, s in TRAIN_PAIRS} == set(SHAPES)


def test_splits_are_disjoint():
    train, test = _specs("train"), _specs("test")
    assert not any(p in HELD_OUT_PAIRS for spec in train for p in spec.pairs())
    assert all(any(p in HELD_OUT_PAIRS for p in spec.pairs()) for spec in test)
    assert all(in_split(s, "train") and not in_split(s, "test") for s in train)
    assert all(in_split(s, "test") and not in_split(s, "train") for s in test)
    # every held-out pair is actually used by the test split
    assert {p for spec in test for p in spec.pairs()} >= HELD_OUT_PAIRS


def test_spec_distribution_weights_singles_counts_and_relations():
    for split in ("train", "test"):
        specs = _specs(split)
        single_object = np.mean([len(s.groups) == 1 and s.groups[0].count == 1 for s in specs])
        multi_count = np.mean([any(g.count > 1 for g in s.groups) for s in specs])
        relation = np.mean([s.relation is not None for s in specs])
        two_groups_no_relation = np.mean([len(s.groups) == 2 and s.relation is None for s in specs])
        # expected 0.16, 0.24 + 0.6 * 0.64 = 0.624, 0.4, 0.2 (KIND_PROBS, *_COUNT_PROBS)
        assert single_object == pytest.approx(0.16, abs=0.03)
        assert multi_count == pytest.approx(0.624, abs=0.04)
        assert relation == pytest.approx(0.4, abs=0.04)
        assert two_groups_no_relation == pytest.approx(0.2, abs=0.03)
        assert Counter(s.relation for s in specs if s.relation).keys() == set(RELATIONS)
        assert {g.count for s in specs for g in s.groups} == {1, 2, 3, 4}


@pytest.mark.parametrize(
    "spec, text",
    [
        (PromptSpec((ObjectGroup(1, "red", "circle"),)), "a red circle"),
        (PromptSpec((ObjectGroup(1, "orange", "star"),)), "an orange star"),
        (PromptSpec((ObjectGroup(2, "blue", "square"),)), "two blue squares"),
        (
            PromptSpec((ObjectGroup(1, "red", "circle"), ObjectGroup(1, "blue", "square")), "left of"),
            "a red circle to the left of a blue square",
        ),
        (
            PromptSpec((ObjectGroup(1, "yellow", "star"), ObjectGroup(2, "purple", "circle")), "above"),
            "a yellow star above two purple circles",
        ),
        (
            PromptSpec((ObjectGroup(3, "green", "triangle"), ObjectGroup(4, "green", "diamond"))),
            "three green triangles and four green diamonds",
        ),
    ],
)
def test_canonical_caption_golden(spec, text):
    assert caption(spec) == text
    assert parse_caption(text) == spec


def test_caption_parse_round_trip_over_all_phrasings():
    rng = np.random.default_rng(3)
    seen_prefixes, seen_links, seen_numbers = set(), set(), set()
    for split in ("train", "test"):
        for spec in _specs(split, n=1500, seed=1):
            assert parse_caption(caption(spec)) == spec
            text = caption(spec, rng)
            assert parse_caption(text) == spec, text
            assert parse_caption("  " + text.upper().replace(" ", "   ") + " ") == spec  # case, whitespace
            prefix = next((p for p in PREFIXES if p and text.startswith(p + " ")), "")
            seen_prefixes.add(prefix)
            seen_numbers.add(text.split()[len(prefix.split())])
            seen_links.update(p for ps in (*RELATION_PHRASES.values(), CONJUNCTIONS) for p in ps if f" {p} " in text)
    assert seen_prefixes == set(PREFIXES)
    # "left of" is also inside "to the left of", so substring checks see every phrase once it is used
    assert seen_links == {p for ps in RELATION_PHRASES.values() for p in ps} | set(CONJUNCTIONS)
    assert seen_numbers == {"a", "an", "one", "two", "three", "four"}


def test_vocabulary_is_exactly_the_words_captions_use():
    rng = np.random.default_rng(0)
    used = {w for spec in _specs("train") + _specs("test") for w in caption(spec, rng).split()}
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    assert used == set(vocab)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("a red blob", "'blob'"),
        ("five red circles", "'five'"),
        ("a pink circle", "'pink'"),
        ("two red circle", "plural"),
        ("a orange circle", "article"),
        ("a red circle near a blue square", "'near a blue square'"),
        ("a red circle and a blue square please", "'please'"),
        ("a red circle to the left of", "expected '<number> <colour> <shape>'"),
        ("a red circle and a red circle", "differ"),
        ("a photo of", "expected '<number> <colour> <shape>'"),
        ("a red circle.", "'circle.'"),
    ],
)
def test_parse_errors_name_the_bad_part(text, fragment):
    with pytest.raises(ValueError, match="cannot parse caption") as err:
        parse_caption(text)
    assert fragment in str(err.value)


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="count"):
        ObjectGroup(5, "red", "circle")
    with pytest.raises(ValueError, match="colour"):
        ObjectGroup(1, "pink", "circle")
    with pytest.raises(ValueError, match="relation needs exactly 2 groups"):
        PromptSpec((ObjectGroup(1, "red", "circle"),), "above")
    with pytest.raises(ValueError, match="split"):
        sample_spec(np.random.default_rng(0), "val")


def _check_layout(spec: PromptSpec, objects, size: int) -> None:
    assert Counter((o.color, o.shape) for o in objects) == Counter(
        {(g.color, g.shape): g.count for g in spec.groups}
    )
    for o in objects:  # inside the canvas
        assert 0 < o.cx - o.hx and o.cx + o.hx < size and 0 < o.cy - o.hy and o.cy + o.hy < size
    for i, a in enumerate(objects):  # no overlap, with a visible gap
        for b in objects[i + 1 :]:
            assert abs(a.cx - b.cx) >= a.hx + b.hx + 2 or abs(a.cy - b.cy) >= a.hy + b.hy + 2


def test_layouts_fit_and_do_not_overlap():
    rng = np.random.default_rng(5)
    for spec in _specs("test", n=300):
        _check_layout(spec, sample_layout(spec, rng, 64), 64)
    crowded = PromptSpec((ObjectGroup(4, "red", "star"), ObjectGroup(4, "blue", "square")), "left of")
    _check_layout(crowded, sample_layout(crowded, rng, 64), 64)  # shrinks radii rather than failing


def test_relation_geometry_holds_for_every_member():
    rng = np.random.default_rng(11)
    specs = [s for s in _specs("train", n=800) if s.relation is not None]
    assert len(specs) > 250
    for spec in specs:
        objects = sample_layout(spec, rng, 64)
        ax, ay = relation_axis(spec.relation)
        first = [o for o in objects if o.group == 0]
        second = [o for o in objects if o.group == 1]
        for a in first:  # every member of group 0 is wholly on the stated side of every member of group 1
            for b in second:
                if ax:
                    assert ax * (a.cx - b.cx) >= a.hx + b.hx, spec
                else:
                    assert ay * (a.cy - b.cy) >= a.hy + b.hy, spec
        offset = np.mean([(o.cx, o.cy) for o in first], axis=0) - np.mean([(o.cx, o.cy) for o in second], axis=0)
        assert offset @ np.array([ax, ay]) >= math.cos(math.radians(45)) * np.linalg.norm(offset) - 1e-9


def test_render_paints_objects_in_their_colour_on_a_light_background():
    rng = np.random.default_rng(2)
    for spec in _specs("train", n=100):
        image, objects = render_with_layout(spec, rng, 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        for o in objects:  # every shape contains its box centre
            pixel = image[int(o.cy), int(o.cx)].astype(int)
            assert np.abs(pixel - np.array(o.rgb)).max() <= 2, (o, pixel)
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
        assert corners.min() > 180 and (corners.max(axis=1) - corners.min(axis=1)).max() < 40


@pytest.mark.parametrize("size", [32, 96, 128])
def test_render_any_size(size):
    rng = np.random.default_rng(size)
    for spec in _specs("test", n=20):
        image, objects = render_with_layout(spec, rng, size)
        assert image.shape == (size, size, 3)
        _check_layout(spec, objects, size)


def test_prompts_are_deterministic_prefix_stable_and_in_split():
    assert prompts("test", 50, seed=3) == prompts("test", 50, seed=3)
    assert prompts("test", 20, seed=3) == prompts("test", 50, seed=3)[:20]
    assert prompts("test", 20, seed=3) != prompts("test", 20, seed=4)
    for split in ("train", "test"):
        for text in prompts(split, 200, seed=0):
            spec = parse_caption(text)
            assert in_split(spec, split) and caption(spec) == text


def test_prompts_of_some_kinds_are_the_unfiltered_streams_subsequence():
    full = prompts("train", 300, seed=2)
    kinds = [spec_kind(parse_caption(t)) for t in full]
    singles = [t for t, k in zip(full, kinds) if k == "single"]
    assert 0.3 < len(singles) / len(full) < 0.5  # KIND_PROBS["single"] = 0.4
    assert prompts("train", len(singles), seed=2, kinds=["single"]) == singles
    two = prompts("test", 40, seed=1, kinds=["pair", "relation"])
    assert all(len(parse_caption(t).groups) == 2 for t in two)
    assert {spec_kind(parse_caption(t)) for t in two} == {"pair", "relation"}
    assert prompt_union([singles[:3], two[:2]]) == singles[:3] + two[:2]
    for bad in ([], ["singles"]):
        with pytest.raises(ValueError, match="kinds must be"):
            prompts("train", 5, seed=0, kinds=bad)
    for n in (2.5, -1, "8", True):  # 2.5 used to round up silently to 3 prompts
        with pytest.raises(ValueError, match="whole number >= 0"):
            prompts("train", n, seed=0)
    with pytest.raises(ValueError, match="seed must be a whole number"):
        prompts("train", 4, seed=1.5)
    assert prompts("train", np.int64(3), seed=np.int64(2)) == full[:3] and prompts("train", 0, seed=2) == []


def test_dataset_items_are_deterministic_and_batch():
    ds = ShapesDataset("train", num_samples=64, seed=9)
    again = ShapesDataset("train", num_samples=64, seed=9)
    assert len(ds) == 64
    item = ds[5]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert torch.equal(again[5]["image"], item["image"]) and again[5]["caption"] == item["caption"]
    assert not torch.equal(ds[6]["image"], item["image"])
    assert not torch.equal(ShapesDataset("train", 64, seed=10)[5]["image"], item["image"])
    assert in_split(parse_caption(item["caption"]), "train")
    assert all(in_split(parse_caption(ShapesDataset("test", 30, 0)[i]["caption"]), "test") for i in range(30))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 3, 64, 64) and len(batch["caption"]) == 8
    with pytest.raises(IndexError):
        ds[64]


def test_mixture_draws_its_splits_at_their_shares_and_renders_that_splits_scene():
    mix = ShapesMixture({"train": 0.7, "test": 0.3}, 4000, seed=3)
    names = [mix.split_of(i) for i in range(4000)]
    share = names.count("test") / 4000
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5  # binomial, 4 standard errors
    for i in range(8):  # item i is item i of the chosen split's dataset
        ref = ShapesDataset(names[i], 4000, 3)[i]
        got = mix[i]
        assert got["caption"] == ref["caption"] and torch.equal(got["image"], ref["image"])
    assert ShapesMixture({"train": 0.7, "test": 0.3}, 4000, seed=3)[5]["caption"] == mix[5]["caption"]
    assert {ShapesMixture({"test": 1.0}, 50, 0).split_of(i) for i in range(50)} == {"test"}


@pytest.mark.parametrize("splits, match", [({}, "splits must map"), ({"val": 1.0}, "split must be one of"),
                                           ({"train": 0.7, "test": 0.2}, "sum to 1"),
                                           ({"train": 1.2, "test": -0.2}, "must be a number > 0")])
def test_mixture_rejects_bad_shares(splits, match):
    with pytest.raises(ValueError, match=match):
        ShapesMixture(splits, 10, 0)


@pytest.mark.parametrize("kind", ["color", "shape", "count", "layout"])
def test_perturb_spec_changes_exactly_the_asked_thing(kind):
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = sample_spec(rng, "train")
        new = perturb_spec(spec, kind, rng)
        assert new != spec  # a valid spec (PromptSpec checks itself) that no longer matches the caption
        if kind in ("color", "shape", "count"):
            assert len(new.groups) == len(spec.groups) and new.relation == spec.relation
            changed = [(a, b) for a, b in zip(spec.groups, new.groups) if a != b]
            assert len(changed) == 1
            (a, b), = changed
            keep = {"color": ("shape", "count"), "shape": ("color", "count"), "count": ("color", "shape")}[kind]
            assert all(getattr(a, f) == getattr(b, f) for f in keep)
        elif len(spec.groups) == 1:
            assert new.groups[0] == spec.groups[0] and len(new.groups) == 2  # an extra group
        else:
            assert (new.groups == spec.groups and new.relation != spec.relation) or \
                (len(new.groups) == 1 and new.groups[0] in spec.groups)  # flipped, or a group missing


def test_drift_blends_one_groups_fill_towards_another_colour():
    """Replaying the draws: the square's fill is (1 - t) * its jittered yellow + t * another palette colour, with t
    in DRIFT_RANGE; the other kinds are left to their spec tests."""
    spec = PromptSpec((ObjectGroup(1, "yellow", "square"),))
    rng = np.random.default_rng(3)
    seen = 0
    while seen < 5:
        state = rng.bit_generator.state
        image, kind = mismatched_render(spec, rng)
        if kind != "drift":
            continue
        seen += 1
        replay = np.random.default_rng(0)
        replay.bit_generator.state = state
        _choice(replay, MISMATCH_PROBS)
        (o,) = sample_layout(spec, replay)
        assert replay.integers(1) == 0  # the group
        other = np.array(COLORS[str(replay.choice([c for c in COLORS if c != "yellow"]))], dtype=float)
        t = replay.uniform(*DRIFT_RANGE)
        expected = np.rint((1 - t) * np.array(o.rgb) + t * other)
        np.testing.assert_array_equal(image[int(o.cy), int(o.cx)], expected)  # the square's centre is all fill
        assert np.abs(expected - np.array(COLORS["yellow"])).max() > 12  # off the palette's jitter


def test_dataset_mismatch_keeps_captions_and_the_matched_items():
    plain = ShapesDataset("train", 400, seed=5)
    mixed = ShapesDataset("train", 400, seed=5, mismatch=0.25)
    same = [bool((plain[i]["image"] == mixed[i]["image"]).all()) for i in range(400)]
    assert all(plain[i]["caption"] == mixed[i]["caption"] for i in range(400))
    assert 0.18 < 1 - np.mean(same) < 0.32  # the share departs by sampling noise only (sd 0.022)
    all_mixed = ShapesDataset("train", 50, seed=5, mismatch=1.0)
    assert not any(bool((plain[i]["image"] == all_mixed[i]["image"]).all()) for i in range(50))
    mixture = ShapesMixture({"train": 0.5, "test": 0.5}, 20, seed=5, mismatch=1.0)
    assert all(p.mismatch == 1.0 for p in mixture.parts)
    with pytest.raises(ValueError, match="share of mismatched items"):
        ShapesDataset("train", 4, seed=0, mismatch=1.5)


@pytest.mark.parametrize("kind", ["color", "shape"])
def test_a_train_images_changed_colour_or_shape_keeps_to_train_pairs(kind, monkeypatch):
    from shapes.data import TRAIN_PAIRS, ShapesDataset

    rng, train = np.random.default_rng(1), set(TRAIN_PAIRS)
    seen_held_out_without = 0
    for _ in range(400):
        spec = sample_spec(rng, "train")
        new = perturb_spec(spec, kind, rng, TRAIN_PAIRS)
        assert all((g.color, g.shape) in train for g in new.groups)
        seen_held_out_without += any((g.color, g.shape) not in train
                                     for g in perturb_spec(spec, kind, rng).groups)
    assert seen_held_out_without > 0  # unrestricted, the same draws do reach held-out pairs
    import shapes.data

    given = []
    monkeypatch.setattr(shapes.data, "perturb_spec", lambda s, k, r, pairs=None: given.append(pairs) or s)
    for split in ("train", "test"):  # the train split passes the train pairs, the test split none
        given.clear()
        for _ in ShapesDataset(split, 8, seed=0, mismatch=1.0):
            pass
        assert given and all(p is (TRAIN_PAIRS if split == "train" else None) for p in given)  # (drift: no call)
