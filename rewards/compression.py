"""JPEG compressibility rewards (DDPO paper): minus / plus the JPEG file size in kB at a fixed quality."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Reward, check_images, register


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size in kB of each image of ``images`` ``[B, 3, H, W]`` in ``[0, 1]``; float32 ``[B]`` on the input's device.

    Pixels are quantised as PIL does for 8-bit images: ``round(x * 255)`` after clamping to ``[0, 1]``.
    """
    check_images(images)
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Reward = minus the JPEG size in kB (smaller files score higher). Not differentiable (JPEG is discrete)."""

    #: 8-bit quantisation and a PIL encoder on the CPU: piecewise constant in the pixels, no graph.
    differentiable = False

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg quality must be in [1, 100]; got {quality}")
        self.quality = int(quality)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)


@register("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """Reward = the JPEG size in kB (larger files score higher)."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_size_kb(images, self.quality)
