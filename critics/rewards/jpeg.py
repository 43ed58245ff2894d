"""JPEG (in)compressibility, the toy rewards of DDPO (Black et al. 2023, arXiv 2305.13301, Sec. 6.1).

    r_compress(x)   = −size_kB(JPEG_q95(x))
    r_incompress(x) = +size_kB(JPEG_q95(x))

with size in kilobytes (1 kB = 1000 bytes) of the image quantised to uint8 and encoded by PIL at quality 95,
as ddpo-pytorch's ``jpeg_compressibility``. Not differentiable (an entropy coder); the paper's StitchVM
(Sec. 4 limitations) cannot stand in for it either. Runs on the CPU, one image at a time.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from critics.rewards.base import check_inputs

JPEG_QUALITY = 95  # DDPO's setting
BYTES_PER_KB = 1000


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """JPEG size in kB of each image (B, 3, H, W) in [0, 1] -> (B,) float32 on the images' device."""
    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    sizes = []
    for pixel_array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixel_array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / BYTES_PER_KB)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JPEGCompressibility(nn.Module):
    """r(x) = −JPEG size in kB at quality 95 (smaller files score higher); prompts ignored."""

    differentiable = False

    def __init__(self, quality: int = JPEG_QUALITY) -> None:
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], prompts (B,) (ignored) -> reward (B,) float32, no gradient."""
        check_inputs(images, prompts)
        return -jpeg_size_kb(images, self.quality)


class JPEGIncompressibility(JPEGCompressibility):
    """r(x) = +JPEG size in kB at quality 95 (larger files score higher); prompts ignored."""

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], prompts (B,) (ignored) -> reward (B,) float32, no gradient."""
        check_inputs(images, prompts)
        return jpeg_size_kb(images, self.quality)
