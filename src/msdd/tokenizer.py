"""The library API: `Tokenizer` = encoder + multi-scale flow decoder + latent statistics.

    tok = Tokenizer.from_pretrained("path/to/model")        # or Tokenizer(model_config)
    z = tok.encode(images)                                  # (B, 3, R, R) in [-1, 1] -> (B, L, C)
    x = tok.decode(z, steps=[10, 10, 10, 10], cfg=1.0, generator=torch.Generator().manual_seed(0))
    tok.save_pretrained("out/model")

`images` may also be uint8 tensors (B, 3, R, R), a PIL image or a list of PIL images (centre-cropped
to the model resolution). A distilled student (`config.one_step`) decodes with one step per stage by
default.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from msdd.config import ModelConfig
from msdd.flow.sampler import sample
from msdd.flow.schedule import StageWindow, stage_windows
from msdd.models.decoder import Decoder
from msdd.models.encoder import Encoder


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on `device` when asked, else a no-op context."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class Tokenizer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        args = (config.image_size, config.latent_tokens, config.latent_dim)
        self.encoder = Encoder(config.encoder, *args)
        self.decoder = Decoder(config.decoder, *args)
        # Per-channel statistics of z over a dataset (`msdd latent-stats`), for downstream models.
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_std", torch.ones(config.latent_dim))
        self._warned_steps = False

    # ------------------------------------------------------------------ properties

    @property
    def windows(self) -> tuple[StageWindow, ...]:
        c = self.config
        return stage_windows(c.flow.num_stages, c.image_size, c.flow.gamma)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def default_steps(self) -> tuple[int, ...]:
        return (1,) * self.config.flow.num_stages if self.config.one_step else tuple(self.config.sampling.steps)

    # ------------------------------------------------------------------ input checks

    def prepare_images(self, images) -> torch.Tensor:
        """Any accepted image input -> float (B, 3, R, R) in [-1, 1] on the model's device."""
        from PIL import Image  # local: PIL is only needed for PIL inputs

        from msdd.data.images import center_crop_arr, to_tensor

        r = self.config.image_size
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not all(isinstance(im, Image.Image) for im in images):
                raise TypeError("a list of images must hold PIL images; stack tensors into (B, 3, H, W) instead")
            images = torch.stack([to_tensor(center_crop_arr(np.asarray(im.convert("RGB")), r)) for im in images])
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, numpy array or PIL image(s), got {type(images).__name__}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != r or images.shape[3] != r:
            raise ValueError(
                f"images must have shape (B, 3, {r}, {r}) for this {r}px model, got {tuple(images.shape)}; "
                f"pass PIL images to centre-crop automatically, or crop/resize to {r}x{r} first"
            )
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        elif not images.is_floating_point():
            raise TypeError(f"images must be float in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
        else:
            lo, hi = images.min().item(), images.max().item()
            if lo < -1.001 or hi > 1.001:
                hint = " (looks like [0, 255]: pass uint8, or x / 127.5 - 1)" if hi > 1.5 else ""
                raise ValueError(f"float images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
            if not torch.isfinite(images).all():
                raise ValueError("images contain NaN or inf")
        return images.float().to(self.device)

    def check_latents(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"latents must be a float tensor of shape (B, {c.latent_tokens}, {c.latent_dim})")
        if z.ndim == 2:
            z = z[None]
        if z.ndim != 3 or z.shape[1:] != (c.latent_tokens, c.latent_dim):
            raise ValueError(
                f"latents must have shape (B, {c.latent_tokens}, {c.latent_dim}) (tokens, channels) for this "
                f"model, got {tuple(z.shape)}"
            )
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or inf")
        return z.float().to(self.device)

    def resolve_steps(self, steps: int | Sequence[int] | None) -> tuple[int, ...]:
        s = self.config.flow.num_stages
        if steps is None:
            return self.default_steps()
        steps = (int(steps),) * s if isinstance(steps, int) else tuple(int(n) for n in steps)
        if len(steps) != s or any(n < 1 for n in steps):
            raise ValueError(f"steps must be an int >= 1 or a list of {s} ints >= 1 (one per stage), got {steps}")
        if self.config.one_step and any(n > 1 for n in steps) and not self._warned_steps:
            warnings.warn(f"this decoder was distilled for one step per stage; decoding with {list(steps)}",
                          stacklevel=3)
            self._warned_steps = True
        return steps

    # ------------------------------------------------------------------ API

    @torch.no_grad()
    def encode(self, images, bf16: bool = False) -> torch.Tensor:
        """Images -> latents z (B, L, C) (raw; see `normalize_latents`)."""
        x = self.prepare_images(images)
        with autocast(x.device, bf16):
            return self.encoder(x).float()

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        steps: int | Sequence[int] | None = None,
        cfg: float | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        bf16: bool = False,
        return_stages: bool = False,
    ):
        """Latents (B, L, C) -> images (B, 3, R, R) in [-1, 1].

        steps: Euler steps per stage (int or list; default: the model's own schedule); cfg: guidance
        scale (default: the model's); generator: source of all noise (default: a CPU generator seeded
        with `seed`, so the same call gives the same image). return_stages: also return the image at
        the end of every stage.
        """
        z = self.check_latents(z)
        steps = self.resolve_steps(steps)
        cfg = self.config.sampling.cfg if cfg is None else float(cfg)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        with autocast(z.device, bf16):
            x, stages = sample(
                self.decoder, z, self.windows, steps, cfg=cfg, gamma=self.config.flow.gamma,
                generator=generator, return_stages=True,
            )
        x = x.clamp(-1, 1)
        return (x, [s.clamp(-1, 1) for s in stages]) if return_stages else x

    def reconstruct(self, images, **decode_kwargs) -> torch.Tensor:
        return self.decode(self.encode(images, bf16=decode_kwargs.get("bf16", False)), **decode_kwargs)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std + self.latent_mean

    # ------------------------------------------------------------------ I/O (see msdd.hub)

    def save_pretrained(self, directory, **extra_metadata) -> None:
        from msdd.hub import save_tokenizer

        save_tokenizer(self, directory, **extra_metadata)

    @classmethod
    def from_pretrained(cls, path=None, device: str | torch.device = "cpu") -> "Tokenizer":
        from msdd.hub import load_tokenizer

        return load_tokenizer(path, device=device)
