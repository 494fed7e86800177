"""The checks every front end applies to what a user passes (`Tokenizer`, `OnnxTokenizer`): images, latents and the
source of decoding noise. A wrong input is a ValueError or TypeError that names the argument and what it should be,
never an error deep inside a layer or a silently wrong image."""

from __future__ import annotations

import numbers
import sys

import numpy as np
import torch


def image_batch(images, resolution: int, crop: bool):
    """PIL image(s), array or tensor -> a tensor (B, 3, H, W) as given (PIL: float in [-1, 1], centre-cropped to
    `resolution` when `crop`), or a list of (1, 3, H, W) tensors for PIL images kept at their sizes."""
    from PIL import Image  # local: PIL is only needed for PIL inputs

    from msdd.data.images import center_crop_arr, pil_to_rgb, to_tensor

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images to encode: got an empty list; pass one or more images")
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list of images must hold PIL images; stack tensors into (B, 3, H, W) instead")
        if any(min(im.size) == 0 for im in images):
            raise ValueError(f"an image of size {next(im.size for im in images if min(im.size) == 0)} has no pixels")
        # the files' own conversion (EXIF rotation, 16-bit/float scaling, alpha on white), not convert("RGB")
        arrays = [pil_to_rgb(im) for im in images]
        if not crop:
            return [to_tensor(a)[None] for a in arrays]
        images = torch.stack([to_tensor(center_crop_arr(a, resolution)) for a in arrays])
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "biuf":
            raise TypeError(f"images of numpy dtype {images.dtype} hold no pixel values: pass uint8 or float arrays")
        # a copy where torch cannot take the array as it is: negative strides (img[..., ::-1], BGR to RGB), big-endian
        images = torch.from_numpy(np.ascontiguousarray(images, dtype=images.dtype.newbyteorder("=")))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor, numpy array or PIL image(s), got {type(images).__name__}")
    if images.ndim in (3, 4) and images.shape[-1] in (1, 3, 4) and images.shape[-3] not in (1, 3):
        given, wanted, order = ("(H, W, C)", "(3, H, W)", "2, 0, 1") if images.ndim == 3 else (
            "(B, H, W, C)", "(B, 3, H, W)", "0, 3, 1, 2")
        raise ValueError(f"images of shape {tuple(images.shape)} look channels-last {given}: pass {wanted}, e.g. "
                         f"torch.from_numpy(array).permute({order})")
    return images[None] if images.ndim == 3 else images


def image_values(images: torch.Tensor) -> torch.Tensor:
    """A (B, 3, H, W) batch: uint8 in [0, 255] or float in [-1, 1] -> float32 in [-1, 1] (detached, on its device)."""
    if images.shape[0] == 0 or images.numel() == 0:
        raise ValueError(f"no images to encode: got an empty batch {tuple(images.shape)}; pass one or more images")
    if images.dtype == torch.uint8:
        return images.detach().float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    images = images.detach()
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.001 or hi > 1.001:
        hint = " (looks like [0, 255]: pass uint8, or x / 127.5 - 1)" if hi > 1.5 else ""
        raise ValueError(f"float images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    return images.float()


def model_images(images, resolution: int) -> torch.Tensor:
    """Any accepted image input for an encoder of `resolution` -> float32 (B, 3, R, R) in [-1, 1] (PIL images
    centre-cropped to R; tensors and arrays must already be R x R)."""
    images = image_batch(images, resolution, crop=True)
    r = resolution
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != r or images.shape[3] != r:
        raise ValueError(f"images must have shape (B, 3, {r}, {r}) for this {r}px model, got {tuple(images.shape)}; "
                         f"pass PIL images to centre-crop automatically, crop/resize to {r}x{r} first, or call "
                         "reconstruct(), which tiles images of any size")
    return image_values(images)


def latent_values(z, shape: tuple[int, ...], spatial: bool) -> torch.Tensor:
    """Latents (B, *shape) or one latent (*shape) -> finite float32 (B, *shape) (detached, on their device)."""
    want = f"(B, {', '.join(map(str, shape))})"
    what = "(channels, height, width)" if spatial else "(tokens, channels)"
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"latents must be a float tensor of shape {want}, got "
                        f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
    z = z.detach()
    if z.ndim == len(shape):
        z = z[None]
    if z.ndim != len(shape) + 1 or tuple(z.shape[1:]) != shape:
        raise ValueError(f"latents must have shape {want} {what} for this model, got {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError(f"no latents to decode: got an empty batch {tuple(z.shape)}; pass one or more")
    bad = ~torch.isfinite(z)
    if bad.any():
        raise ValueError(f"latents contain {int(z.isnan().sum())} NaN and {int((bad & ~z.isnan()).sum())} inf "
                         f"values (of {z.numel()}); decode needs finite latents: check what produced them "
                         "(NaN weights or inputs of the encoder, a bf16/fp16 overflow)")
    z32 = z.float()  # the decoder runs in float32: float64 values beyond its range would become inf here
    if not torch.isfinite(z32).all():
        raise ValueError(f"latents hold values up to {z.abs().max().item():.3g}, beyond the float32 range "
                         f"(max {torch.finfo(torch.float32).max:.3g}) the decoder runs in; they would become inf")
    return z32


def check_seed(seed) -> int:
    """A seed: a whole number torch's generators take (bools, floats and strings are errors, not truncated)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2**63 <= int(seed) < 2**64:
        raise TypeError(f"seed must be a whole number (an int in [-2**63, 2**64)), got {seed!r}")
    return int(seed)


def check_flags(**flags) -> None:
    """Switches such as bf16= / int8= / return_stages= are bools: a string like "no" or "false" would count as on."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def user_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for a warning issued by this function's caller, that points at the first
    frame outside msdd and torch (the user's line, not `torch.no_grad`'s wrapper or an msdd helper)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("msdd", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def noise_source(generator, seed, batch: int):
    """A decode's source of noise: `generator` (a torch.Generator, or a list of one per image) as given, else a CPU
    generator seeded with `seed`."""
    if generator is None:
        return torch.Generator().manual_seed(check_seed(seed))
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"a list of generators needs one torch.Generator per image ({batch}), got "
                             f"{[type(g).__name__ for g in generator]}")
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of one per image, got "
                        f"{type(generator).__name__}; or pass seed=")
    return generator


__all__ = ["check_flags", "check_seed", "image_batch", "image_values", "latent_values", "model_images", "noise_source",
           "user_stacklevel"]
