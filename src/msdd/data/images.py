"""Turn any image file into uint8 RGB, convert to and from model tensors, and crop the ADM way.

Every image that reaches the model passes through `pil_to_rgb` (files via `load_image`, PIL images
given to `Tokenizer.encode` directly), so this is where the odd formats people actually have on disk
(16-bit PNGs, CMYK JPEGs, phone photos with an EXIF rotation, PNGs with transparency) are made
uniform. The crops follow ADM (guided-diffusion): shrink by exact 2x box filters while the image is
large, which is fast and alias-free, then one bicubic resize.
"""

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


RESAVE = "Re-save it as an ordinary PNG/JPEG, or remove it from the folder."


class BadImageError(ValueError):
    """An image file that cannot be used; `path` and `reason` say which and why, `fix` what to do
    (default: re-save or remove it)."""

    def __init__(self, path: str | Path, reason: str, fix: str = RESAVE):
        self.path, self.reason, self.fix = str(path), reason, fix
        super().__init__(f"unusable image {self.path}: {reason}. {fix}".rstrip())


def load_image(path: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode `path` (or a file's bytes, named `name` in errors) fully into a uint8 (H, W, 3) RGB
    array, upright as the camera meant it."""
    data = isinstance(path, (bytes, bytearray))
    fp = io.BytesIO(path) if data else path
    try:
        with Image.open(fp) as img:
            img.load()  # decode every byte now: a truncated file must fail here, not later
            return pil_to_rgb(img)
    # PIL's decoders raise a zoo of types on malformed files (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...); any of them means this one file is unusable.
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".replace(f" {fp!r}", "")  # PIL names a BytesIO by its repr
        raise BadImageError(name or ("<bytes>" if data else path), reason) from e


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3) RGB, upright: EXIF rotation applied, 16-bit and float data scaled by
    their full range, transparency composited on white. `load_image` and `Tokenizer.encode` share it."""
    return _to_rgb(ImageOps.exif_transpose(img))


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I") or img.mode == "F":  # one channel of wide ints or floats
        gray = _wide_to_uint8(np.asarray(img), img.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        # Transparent pixels hold arbitrary colours (often black); show them as white paper.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("RGB"))


def _wide_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale one-channel 16/32-bit or float data to 0..255 by its full scale, not by clipping."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if mode == "F" and lo >= 0 and hi <= 1:
        full = 1.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        full = 255.0
    elif mode != "F" and lo >= 0 and hi <= 65535:
        full = 65535.0  # 16-bit data ("I;16*", or 16-bit PNGs that PIL opens as "I"): /257
    else:  # data outside any standard range: stretch what is there
        a, full = a - lo, max(hi - lo, 1e-12)
    return np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"to_tensor expects a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.array(arr, dtype=np.float32))  # (H, W, 3), a fresh writable copy
    return (x / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float (..., 3, H, W) in [-1, 1] -> uint8 of the same shape."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _resize_shorter(arr: np.ndarray, side: int) -> Image.Image:
    """Resize so the shorter side is `side`: exact 2x box halvings while large, then bicubic."""
    img = Image.fromarray(arr)
    while min(img.size) >= 2 * side:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = side / min(img.size)
    size = (side, round(img.height * scale)) if img.width <= img.height else (round(img.width * scale), side)
    return img.resize(size, resample=Image.BICUBIC)


def center_crop_arr(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): shorter side resized to `size`, centre square kept."""
    out = np.asarray(_resize_shorter(arr, size))
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[top : top + size, left : left + size]


def random_crop_arr(
    arr: np.ndarray, size: int, rng: np.random.Generator, min_frac: float = 0.8, max_frac: float = 1.0
) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): a random square covering min_frac..max_frac of the shorter side."""
    side = int(rng.integers(math.ceil(size / max_frac), math.ceil(size / min_frac) + 1))
    out = np.asarray(_resize_shorter(arr, side))
    top = int(rng.integers(out.shape[0] - size + 1))
    left = int(rng.integers(out.shape[1] - size + 1))
    return out[top : top + size, left : left + size]
