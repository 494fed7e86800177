"""Image grids: one row per image, one column per variant (real, stages, reconstruction, error...)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

HEADER = 14  # pixels of the row of column labels


def grid_image(columns: list[torch.Tensor], pad: int = 2, labels: list[str] | None = None) -> Image.Image:
    """columns: tensors (N, 3, h, w) in [-1, 1], possibly at different resolutions (nearest-upsampled
    to the largest). Returns an RGB PIL image with N rows and len(columns) columns, under a row naming the
    columns when `labels` are given."""
    size = max(c.shape[-1] for c in columns)
    cols = [F.interpolate(c.float().cpu(), size=(size, size), mode="nearest") for c in columns]
    n = cols[0].shape[0]
    canvas = torch.ones(3, n * (size + pad) + pad, len(cols) * (size + pad) + pad)
    for j, col in enumerate(cols):
        for i in range(n):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            canvas[:, y : y + size, x : x + size] = (col[i].clamp(-1, 1) + 1) / 2
    arr = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    grid = Image.fromarray(arr)
    if not labels:
        return grid
    if len(labels) != len(cols):
        raise ValueError(f"labels: got {len(labels)} for {len(cols)} columns; give one label per column, or none")
    out = Image.new("RGB", (grid.width, grid.height + HEADER), "white")
    out.paste(grid, (0, HEADER))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for j, label in enumerate(labels):
        while len(label) > 1 and draw.textlength(label, font=font) > size:  # fit the column
            label = label[:-1]
        draw.text((pad + j * (size + pad) + 1, 2), label, fill="black", font=font)
    return out


def save_grid(columns: list[torch.Tensor], path: str | Path, labels: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(columns, labels=labels).save(path)
    return path
