"""The library API: `Tokenizer` = encoder + decoder + latent statistics, for every model family.

    tok = Tokenizer.from_pretrained("path/to/model")        # or Tokenizer(model_config)
    z = tok.encode(images)                                  # (B, 3, R, R) in [-1, 1] -> (B, L, C)
    x = tok.decode(z, steps=[10, 10, 10, 10], cfg=1.0, generator=torch.Generator().manual_seed(0))
    tok.save_pretrained("out/model")

`images` may also be uint8 tensors (B, 3, R, R), a PIL image or a list of PIL images (centre-cropped
to the model resolution). A distilled student (`config.one_step`) decodes with one step per stage by
default.

`config.family` picks the encoder/decoder pair, the latent shape, the decode and the training loss:

    msdd   token encoder + multi-scale MMDiT flow decoder (SPEC 3-6); z (B, L, C); steps per stage, cfg
    ssdd   token encoder (z (B, L, C)) or f8 conv encoder (z (B, c, R/8, R/8)) + U-Net/transformer flow
           decoder (SPEC 10, `msdd.models.ssdd`); `steps` is one int N (schedule (1 - i/N)^shift); no cfg
    plain  token encoder + the msdd decoder network used once: x = decoder(zeros, tau = 0, z), a
           deterministic autoencoder baseline; `steps` and `cfg` are ignored
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from msdd.config import ModelConfig
from msdd.flow.path import flow_loss
from msdd.flow.sampler import sample as multiscale_sample
from msdd.flow.schedule import StageWindow, stage_windows
from msdd.flow.ssdd import sample_ssdd, ssdd_loss
from msdd.models.decoder import Decoder
from msdd.models.encoder import Encoder
from msdd.models.ssdd import SpatialEncoder, SSDDDecoder


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
        lin = config.uses_linear_path
        self.encoder = (SpatialEncoder(config) if config.spatial_latent
                        else Encoder(config.encoder, *args, linear_path=lin))
        windows = stage_windows(config.flow.num_stages, config.image_size, config.flow.gamma)
        self.decoder = (SSDDDecoder(config) if config.family == "ssdd"
                        else Decoder(config.decoder, *args, linear_path=lin, windows=windows,
                                     prediction=config.flow.prediction if config.family == "msdd" else "v",
                                     refiner=(config.refiner_width, config.refiner_blocks)))
        # Per-channel statistics of z over a dataset (`msdd latent-stats`), for downstream models.
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))
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
        """Euler steps per stage of a default decode; (N,) for ssdd, (1,) for plain (one pass)."""
        c = self.config
        if c.family == "plain":
            return (1,)
        if c.family == "ssdd":
            return (1,) if c.one_step else (c.ssdd.steps,)
        return (1,) * c.flow.num_stages if c.one_step else tuple(c.sampling.steps)

    def passes_per_image(self, steps: Sequence[int], cfg: float) -> int:
        """Decoder forward passes per image of a decode (guidance other than 0 or 1 doubles them)."""
        guided = self.config.family == "msdd" and cfg not in (0.0, 1.0)
        return sum(steps) * (2 if guided else 1)

    # ------------------------------------------------------------------ input checks

    def prepare_images(self, images) -> torch.Tensor:
        """Any accepted image input -> float (B, 3, R, R) in [-1, 1] on the model's device."""
        from PIL import Image  # local: PIL is only needed for PIL inputs

        from msdd.data.images import center_crop_arr, pil_to_rgb, to_tensor

        r = self.config.image_size
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images to encode: got an empty list; pass one or more images")
            if not all(isinstance(im, Image.Image) for im in images):
                raise TypeError("a list of images must hold PIL images; stack tensors into (B, 3, H, W) instead")
            # the files' own conversion (EXIF rotation, 16-bit/float scaling, alpha on white), not convert("RGB")
            images = torch.stack([to_tensor(center_crop_arr(pil_to_rgb(im), r)) for im in images])
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
        if images.shape[0] == 0:
            raise ValueError(f"no images to encode: got an empty batch {tuple(images.shape)}; pass one or more images")
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
        shape = self.config.latent_shape
        want = f"(B, {', '.join(map(str, shape))})"
        what = "(channels, height, width)" if self.config.spatial_latent else "(tokens, channels)"
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"latents must be a float tensor of shape {want}")
        if z.ndim == len(shape):
            z = z[None]
        if z.ndim != len(shape) + 1 or tuple(z.shape[1:]) != shape:
            raise ValueError(f"latents must have shape {want} {what} for this model, got {tuple(z.shape)}")
        bad = ~torch.isfinite(z)
        if bad.any():
            raise ValueError(f"latents contain {int(z.isnan().sum())} NaN and {int((bad & ~z.isnan()).sum())} inf "
                             f"values (of {z.numel()}); decode needs finite latents: check what produced them "
                             "(NaN weights or inputs of the encoder, a bf16/fp16 overflow)")
        z32 = z.float()  # the decoder runs in float32: float64 values beyond its range would become inf here
        if not torch.isfinite(z32).all():
            raise ValueError(f"latents hold values up to {z.abs().max().item():.3g}, beyond the float32 range "
                             f"(max {torch.finfo(torch.float32).max:.3g}) the decoder runs in; they would become inf")
        return z32.to(self.device)

    def resolve_steps(self, steps: int | Sequence[int] | None) -> tuple[int, ...]:
        """Euler steps per stage of a decode: the model's by default, else whole numbers checked (1.7, a
        bool or a string is a ValueError, never truncated to an int)."""
        if steps is None or self.config.family == "plain":  # plain: always one pass
            return self.default_steps()
        s = 1 if self.config.family == "ssdd" else self.config.flow.num_stages
        if isinstance(steps, (torch.Tensor, np.ndarray)):
            steps = steps.tolist()
        many = isinstance(steps, Sequence) and not isinstance(steps, str)
        values = list(steps) if many else [steps]
        bad = [n for n in values if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer))]
        if bad:
            raise ValueError(f"steps must be whole numbers >= 1 (an int, or a list of {s} ints: one per stage), got "
                             f"{steps!r}: {bad[0]!r} is a {type(bad[0]).__name__}; pass ints (they are never rounded)")
        steps = tuple(int(n) for n in values) * (1 if many else s)
        if len(steps) != s or any(n < 1 for n in steps):
            if s == 1 and self.config.family == "ssdd":
                raise ValueError(f"steps must be an int >= 1 for an SSDD model (a single flow), got {steps}")
            raise ValueError(f"steps must be an int >= 1 or a list of {s} ints >= 1 (one per stage), got {steps}")
        if self.config.one_step and any(n > 1 for n in steps) and not self._warned_steps:
            warnings.warn(f"this decoder was distilled for one step per stage; decoding with {list(steps)}",
                          stacklevel=3)
            self._warned_steps = True
        return steps

    def resolve_cfg(self, cfg: float | None) -> float:
        """The guidance scale of a decode: the model's by default; plain ignores it; ssdd has none."""
        if cfg is not None and not (np.isfinite(float(cfg)) and float(cfg) >= 0):
            raise ValueError(f"cfg must be a finite number >= 0 (1 = no guidance, the model's default is "
                             f"{self.config.sampling.cfg:g}), got {cfg}")
        if self.config.family == "plain":
            return 1.0
        if self.config.family == "ssdd":
            if cfg is not None and float(cfg) != 1.0:
                raise ValueError(f"SSDD models have no classifier-free guidance (trained without a null latent); "
                                 f"cfg must be 1, got {cfg}")
            return 1.0
        return self.config.sampling.cfg if cfg is None else float(cfg)

    # ------------------------------------------------------------------ API

    @torch.no_grad()
    def encode(self, images, bf16: bool = False) -> torch.Tensor:
        """Images -> latents z (B, L, C), or (B, c, R/8, R/8) for a spatial latent (raw; see
        `normalize_latents`)."""
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
        """Latents (see `encode`) -> images (B, 3, R, R) in [-1, 1].

        steps: Euler steps per stage (int or list; default: the model's own schedule); cfg: guidance
        scale (default: the model's); generator: source of all noise (default: a CPU generator seeded
        with `seed`, so the same call gives the same image). return_stages: also return the image at
        the end of every stage (ssdd and plain: the final image only).
        """
        z = self.check_latents(z)
        steps = self.resolve_steps(steps)
        cfg = self.resolve_cfg(cfg)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        with autocast(z.device, bf16):
            x, stages = self.sample(z, steps, cfg, generator)
        x = x.clamp(-1, 1)
        return (x, [s.clamp(-1, 1) for s in stages]) if return_stages else x

    def sample(self, z: torch.Tensor, steps: Sequence[int], cfg: float, generator) -> tuple[torch.Tensor, list]:
        """The decode of this model's family on checked latents, without clamping or `no_grad`.
        Returns (images, images at the end of every stage)."""
        if self.config.family == "plain":
            x = self.plain_decode(z)
            return x, [x]
        if self.config.family == "ssdd":
            x = sample_ssdd(self.decoder, z, steps[0], self.config.ssdd.shift, generator=generator)
            return x, [x]
        return multiscale_sample(self.decoder, z, self.windows, steps, cfg=cfg, gamma=self.config.flow.gamma,
                                 generator=generator, return_stages=True)

    def plain_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The plain family's one pass: the decoder on a zero image at tau = 0 (+ x_lin with a linear path)."""
        r, b = self.config.image_size, z.shape[0]
        return self.decoder.end_estimate(z.new_zeros(b, 3, r, r), z.new_zeros(b), z).float()

    def training_loss(self, images: torch.Tensor, generator, perceptual: nn.Module | None = None,
                      repa: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage-1 loss of this model's family on images (B, 3, R, R) in [-1, 1] (encoder and decoder
        trained jointly). Returns (loss, {name: detached value}) for logging."""
        c = self.config
        z = self.encoder(images)
        if c.family == "ssdd":
            s = c.ssdd
            return ssdd_loss(self.decoder, images, z, t_sampling=s.t_sampling, perceptual=perceptual,
                             lpips_weight=s.lpips_weight, repa=repa, repa_weight=s.repa_weight, generator=generator)
        if c.family == "plain":
            x = self.plain_decode(z)
            loss = (x - images).pow(2).mean()
            terms = {"loss_mse": loss.detach()}
            if perceptual is not None and c.flow.lpips_weight > 0:
                l_lpips = perceptual(x, images).mean()
                loss = loss + c.flow.lpips_weight * l_lpips
                terms["loss_lpips"] = l_lpips.detach()
            return loss, terms
        fc = c.flow
        loss, per_stage = flow_loss(
            self.decoder, images, z, self.windows,
            t_sampling=fc.t_sampling, loss_weighting=fc.loss_weighting, sigmoid_bias=fc.sigmoid_bias,
            prediction=fc.prediction,
            cfg_drop=fc.cfg_drop, null_context=self.decoder.null_context,
            perceptual=perceptual, perceptual_weight=fc.lpips_weight, generator=generator,
        )
        return loss, {f"loss_stage{s}": v for s, v in per_stage.items()}

    def init_linear_path(self, pca) -> None:
        """Start the linear path (config.linear_path) as the PCA code `pca` (msdd.models.linear.fit_pca
        with latent_tokens * latent_dim components, on flattened images in [-1, 1])."""
        from msdd.models.linear import init_linear_path

        if not self.config.uses_linear_path:
            raise ValueError("this model has no linear path (model.linear_path=false, or an SSDD spatial latent)")
        init_linear_path(self.encoder.to_linear, self.decoder.from_linear, pca)

    def reconstruct(self, images, **decode_kwargs) -> torch.Tensor:
        return self.decode(self.encode(images, bf16=decode_kwargs.get("bf16", False)), **decode_kwargs)

    def _per_channel(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.view(-1, 1, 1) if self.config.spatial_latent else stat  # channels first for a spatial latent

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._per_channel(self.latent_mean)) / self._per_channel(self.latent_std)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._per_channel(self.latent_std) + self._per_channel(self.latent_mean)

    # ------------------------------------------------------------------ I/O (see msdd.hub)

    def save_pretrained(self, directory, **extra_metadata) -> None:
        from msdd.hub import save_tokenizer

        save_tokenizer(self, directory, **extra_metadata)

    @classmethod
    def from_pretrained(cls, path=None, device: str | torch.device = "cpu") -> "Tokenizer":
        from msdd.hub import load_tokenizer

        return load_tokenizer(path, device=device)
