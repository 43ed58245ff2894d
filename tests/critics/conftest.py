"""Session fixtures shared by the build and value-benchmark tests: a tiny Shapes world and critics built on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.critics.tiny_world import BUILD_YAML, tiny_overrides, write_tiny_shapes_weights


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return write_tiny_shapes_weights(tmp_path_factory.mktemp("tiny_shapes"))


@pytest.fixture(scope="session")
def built(world, tmp_path_factory):
    """(stitchvm, vae_stitch) BuildResults, built through the build command's config path."""
    from critics.build import build, load_config

    out = tmp_path_factory.mktemp("built")
    svm = build(load_config(BUILD_YAML, tiny_overrides(world, out / "stitchvm")))
    vae = build(load_config(BUILD_YAML, tiny_overrides(world, out / "vae_stitch", "kind=vae_stitch")))
    return svm, vae
