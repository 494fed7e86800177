"""Reconstruction metrics through torchmetrics, on images mapped from [-1, 1] to [0, 1] (data_range = 1).

PSNR and SSIM per image; the reference SSIM of the paper's code used data_range = 2 on [-1, 1]
images, which inflates SSIM: we do not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 8-bit grid (what a saved PNG holds), staying in [-1, 1]."""
    return torch.round(to_unit(x) * 255) / 127.5 - 1


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [-1, 1], computed on [0, 1] with data_range 1."""
    return peak_signal_noise_ratio(to_unit(pred), to_unit(target), data_range=1.0, reduction="none", dim=(1, 2, 3))


SSIM_CONVENTION = ("SSIM: Gaussian window 11, sigma 1.5, each channel's SSIM map on the images reflection-padded by 5 "
                   "px, averaged over every pixel and channel (torchmetrics' own average since a 1.4 release, while "
                   "1.4.0 and earlier left a 5 px border out; skimage averages only the windows inside the image: "
                   "0.0002-0.0044 lower for the shipped tiny-64 student and the baselines on the embedded held-out "
                   "set)")


def ssim_maps(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) SSIM maps (SSIM_CONVENTION) of images in [-1, 1], computed on [0, 1], data_range 1."""
    _, full = structural_similarity_index_measure(to_unit(pred), to_unit(target), data_range=1.0, reduction="none",
                                                  return_full_image=True)
    return full


SSIM_MIN_SIDE = 6  # the 5 px reflection padding needs 6 rows and columns
STRIP_PIXELS = 1 << 20  # larger images are scored in strips of rows: the maps of a 12 MP image took 8 GB at once


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of images in [-1, 1]: the mean of `ssim_maps`, whatever the installed torchmetrics averages (its
    versions up to 1.4.0 left out a border of 5 px). NaN for images with a side under SSIM_MIN_SIDE (no SSIM of
    an 11 px window there). Images of more than STRIP_PIXELS pixels are scored in strips of rows, each with 5 rows of
    the image around it (the window's reach), so the map is the same, in bounded memory."""
    h, w = pred.shape[-2:]
    if min(h, w) < SSIM_MIN_SIDE:
        return torch.full(pred.shape[:1], float("nan"), device=pred.device)
    if h * w <= STRIP_PIXELS:
        return ssim_maps(pred, target).flatten(1).mean(1)
    rows, total = max(SSIM_MIN_SIDE, STRIP_PIXELS // w), 0.0
    for top in range(0, h, rows):
        lo, hi = max(0, top - 5), min(h, top + rows + 5)
        strip = ssim_maps(pred[..., lo:hi, :], target[..., lo:hi, :])[..., top - lo:top - lo + min(rows, h - top), :]
        total = total + strip.double().sum((1, 2, 3))
    return (total / (pred.shape[1] * h * w)).float()


def bicubic_side(latent_floats: int) -> int:
    """Side of the largest 3 x s x s image with at most `latent_floats` numbers."""
    return int(math.isqrt(latent_floats // 3))


def bicubic_baseline(images: torch.Tensor, latent_floats: int) -> torch.Tensor:
    """Bicubic down to as many floats as the latent holds (at most), then bicubic back up: the
    simplest 'tokenizer' with the same budget. images (B, 3, H, W) in [-1, 1] (the code is square whatever H and W);
    the result, of the images' size, is rounded to the 8-bit grid (`quantize`), as every reconstruction msdd scores is
    (the PCA baseline's, a model's)."""
    side = bicubic_side(latent_floats)
    small = F.interpolate(images.float(), size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return quantize(F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False))
