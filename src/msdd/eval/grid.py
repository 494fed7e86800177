"""Image grids: one row per image, one column per variant (real, stages, reconstruction, error...)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def grid_image(columns: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """columns: tensors (N, 3, h, w) in [-1, 1], possibly at different resolutions (nearest-upsampled
    to the largest). Returns an RGB PIL image with N rows and len(columns) columns."""
    size = max(c.shape[-1] for c in columns)
    cols = [F.interpolate(c.float().cpu(), size=(size, size), mode="nearest") for c in columns]
    n = cols[0].shape[0]
    canvas = torch.ones(3, n * (size + pad) + pad, len(cols) * (size + pad) + pad)
    for j, col in enumerate(cols):
        for i in range(n):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            canvas[:, y : y + size, x : x + size] = (col[i].clamp(-1, 1) + 1) / 2
    arr = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


def save_grid(columns: list[torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(columns).save(path)
    return path
