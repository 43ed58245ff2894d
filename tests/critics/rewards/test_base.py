"""Differentiable CLIP preprocessing against open_clip's own transforms, and the input checks."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from critics.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessCfg,
    check_inputs,
    preprocess,
)
from tests.critics.rewards.conftest import pil_uint8_image

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def to_pil(images: torch.Tensor) -> Image.Image:
    return Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy())


@pytest.mark.parametrize("height,width", [(40, 56), (57, 33), (20, 20)])
def test_shortest_equals_open_clip_tensor_transform(height, width):
    # open_clip's eval transform without its PIL-only steps (mode conversion, ToTensor) runs on tensors:
    # torchvision Resize(shortest side) + CenterCrop + Normalize. Same ops, so equal to float precision.
    reference = open_clip.image_transform(32, is_train=False, resize_mode="shortest")
    tensor_steps = [t for t in reference.transforms if type(t).__name__ in ("Resize", "CenterCrop", "Normalize")]
    assert len(tensor_steps) == 3
    images = torch.rand(2, 3, height, width)
    expected = images
    for step in tensor_steps:
        expected = step(expected)
    got = preprocess(images, PreprocessCfg(image_size=(32, 32)))
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_matches_open_clip_pil_pipeline(resize_mode):
    # The full PIL pipeline quantises to uint8 after resizing: |error| <= ~0.5/255 / std ~ 0.008 per pixel.
    images = pil_uint8_image(48, 72, seed=1)
    reference = open_clip.image_transform(32, is_train=False, resize_mode=resize_mode)
    expected = reference(to_pil(images)).unsqueeze(0)
    got = preprocess(images, PreprocessCfg(image_size=(32, 32), resize_mode=resize_mode))
    assert got.shape == expected.shape == (1, 3, 32, 32)
    assert (got - expected).abs().mean() < 5e-3
    assert (got - expected).abs().max() < 0.05


def test_longest_pads_with_black():
    # 48x72 -> longest side 72 -> 32: resized to 21x32 (round(48 / 2.25) = 21), padded 5 rows top, 6 bottom.
    images = torch.rand(1, 3, 48, 72) * 0.5 + 0.25
    got = preprocess(images, PreprocessCfg(image_size=(32, 32), resize_mode="longest"))
    black = (0 - MEAN) / STD  # (1, 3, 1, 1)
    torch.testing.assert_close(got[:, :, :5], black.expand(1, 3, 5, 32))
    torch.testing.assert_close(got[:, :, 26:], black.expand(1, 3, 6, 32))
    assert not torch.isclose(got[:, :, 5:26], black).any()


def test_identity_size_is_normalisation_only():
    images = torch.rand(2, 3, 32, 32)
    got = preprocess(images, PreprocessCfg(image_size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = (images - mean) / std
    torch.testing.assert_close(got, expected)


def test_preprocess_keeps_float64_and_casts_to_tower_dtype():
    images = torch.rand(1, 3, 40, 40, dtype=torch.float64)
    assert preprocess(images, PreprocessCfg(image_size=(32, 32))).dtype == torch.float64
    assert preprocess(images, PreprocessCfg(image_size=(32, 32)), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_preprocess_cfg():
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        PreprocessCfg(image_size=(32, 32), resize_mode="crop")


@pytest.mark.parametrize(
    "images,prompts,match",
    [
        (torch.rand(2, 32, 32, 3), ["a", "b"], r"shape \(B, 3, H, W\).*permute"),
        (torch.rand(3, 32, 32), ["a", "b", "c"], r"shape \(B, 3, H, W\)"),
        ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), ["a", "b"], "floating-point.*uint8"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"in \[0, 1\]"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], r"in \[0, 1\]"),
        (np.zeros((2, 3, 8, 8), dtype=np.float32), ["a", "b"], "torch.Tensor"),
        (torch.rand(2, 3, 8, 8), ["a"], "1 prompts for a batch of 2"),
        (torch.rand(2, 3, 8, 8), "ab", r"list\[str\]"),
        (torch.rand(2, 3, 8, 8), ["a", 3], r"list\[str\]"),
    ],
)
def test_check_inputs_errors(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        check_inputs(images, prompts)


def test_check_inputs_accepts_bounds():
    check_inputs(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(2, 3, 1, 2), ["a", ""])


def test_a_first_call_in_inference_mode_leaves_later_calls_differentiable():
    # the per-channel constants are cached on first use; made under inference_mode they would break backward later
    from critics.rewards.base import channel_constants

    channel_constants.cache_clear()
    cfg = PreprocessCfg(image_size=(8, 8), mean=(0.1, 0.2, 0.3), std=(0.7, 0.8, 0.9))
    with torch.inference_mode():
        preprocess(torch.rand(1, 3, 8, 8), cfg)
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    preprocess(x, cfg).sum().backward()
    torch.testing.assert_close(x.grad[0, :, 0, 0], 1 / torch.tensor([0.7, 0.8, 0.9]))  # 8 -> 8: no resize
