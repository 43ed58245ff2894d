"""DDPO's JPEG (in)compressibility rewards."""

import io

import pytest
import torch
from PIL import Image

from critics.rewards import JPEGCompressibility, JPEGIncompressibility


def test_flat_image_beats_noisy_one():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    compress = JPEGCompressibility()(images, ["", ""])
    incompress = JPEGIncompressibility()(images, ["", ""])
    assert compress.shape == (2,) and compress.dtype == torch.float32
    assert compress[0] > compress[1] and incompress[1] > incompress[0]
    torch.testing.assert_close(incompress, -compress)


def test_size_is_pil_quality_95_in_kilobytes():
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    pixels = (images[0] * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    expected = len(buffer.getvalue()) / 1000
    assert JPEGIncompressibility()(images, ["x"]).item() == pytest.approx(expected)


def test_not_differentiable_and_checks_inputs():
    reward = JPEGCompressibility()
    assert reward.differentiable is False and JPEGIncompressibility.differentiable is False
    assert not reward(torch.rand(1, 3, 8, 8, requires_grad=True), [""]).requires_grad
    with pytest.raises(ValueError, match="floating-point"):
        reward(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [""])
    with pytest.raises(ValueError, match="quality"):
        JPEGCompressibility(quality=0)
