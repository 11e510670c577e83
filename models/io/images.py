"""Images in [-1, 1] as a PNG grid: its bytes (the server) or a file written atomically.

The grid is torchvision's ``make_grid`` layout (padding, grey 0.5 between tiles), drawn here with Pillow, which
matplotlib already brings, so the runtime needs no torchvision.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image

from .files import atomic_path


def tile_images(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.5) -> torch.Tensor:
    """[N, C, H, W] -> [C, H', W']: ``nrow`` tiles a row, ``padding`` pixels of ``pad_value`` around each tile.

    One image comes back alone, without padding (as torchvision's ``make_grid``)."""
    if images.shape[0] == 1:
        return images[0]
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = int(math.ceil(n / cols))
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        grid[:, y * cell_h + padding: y * cell_h + padding + h, x * cell_w + padding: x * cell_w + padding + w] = images[k]
    return grid


def image_grid_png(images: torch.Tensor, nrow: int | None = None, value_range=(-1, 1), padding: int = 2) -> bytes:
    """Images in [-1, 1] as the bytes of one PNG grid (``padding=0`` and one image: that image alone)."""
    lo, hi = value_range
    images = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = tile_images(images, nrow, padding)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels))
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, value_range=(-1, 1)):
    """Images in [-1, 1] to a PNG grid, atomically."""
    png = image_grid_png(images, nrow, value_range)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
