"""Image grids of samples, with their prompts and rewards in a sidecar text file."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """Tile ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` into one PIL image, ``columns`` per row (default ~sqrt(B))."""
    batch, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(batch))
    rows = math.ceil(batch / columns)
    grid = torch.ones(3, rows * height, columns * width)
    for index, image in enumerate(images.detach().float().clamp(0, 1).cpu()):
        r, c = divmod(index, columns)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_image_grid(images: torch.Tensor, prompts: list[str], rewards: list[float], path: Path) -> Image.Image:
    """Write ``path`` (PNG grid, row-major) and ``path.with_suffix('.txt')`` (index, reward, prompt per line); returns
    the grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid = image_grid(images)
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    lines = [f"{i}\t{r:.6g}\t{p}" for i, (p, r) in enumerate(zip(prompts, rewards))]
    path.with_suffix(".txt").write_text("index\treward\tprompt\n" + "\n".join(lines) + "\n")
    return grid
