"""Images in [-1, 1] as a PNG grid: its bytes (the server) or a file written atomically."""
from __future__ import annotations

import io
import os

import torch

from .files import atomic_path


def image_grid_png(images: torch.Tensor, nrow: int | None = None, value_range=(-1, 1), padding: int = 2) -> bytes:
    """Images in [-1, 1] as the bytes of one PNG grid (``padding=0`` and one image: that image alone)."""
    from torchvision.utils import save_image
    import math
    lo, hi = value_range
    images = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    buffer = io.BytesIO()
    save_image(images, buffer, nrow=nrow, format="png", pad_value=0.5, padding=padding)
    return buffer.getvalue()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, value_range=(-1, 1)):
    """Images in [-1, 1] to a PNG grid, atomically."""
    png = image_grid_png(images, nrow, value_range)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
