"""Flow matching for the latent generator: the training loss and the Euler sampler, on normalised latents
(`Tokenizer.normalize_latents`). The convention of the rest of the package (and SiT's linear path):

    x_t = (1 - t) x0 + t n      x0 a normalised latent, n ~ N(0, I), t ~ U(0, 1); t = 1 is noise
    v   = n - x0                the network predicts v (MSE)
    sampling: t_i = 1 - i/N, Euler steps x <- x + (t_{i+1} - t_i) v from pure noise (N steps, N passes)
    guidance g: v = v_null + g (v_label - v_null), both branches in one doubled batch (g = 1: one pass)

Every random draw comes from the `generator` argument (a torch.Generator), so a seed fixes the samples.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from msdd.config.model import MAX_STEPS
from msdd.flow.path import randn, sample_r
from msdd.flow.sampler import guide, passes_per_step
from msdd.generator.model import LatentDiT


def flow_matching_loss(model: LatentDiT, x0: torch.Tensor, labels: torch.Tensor | None,
                       generator: torch.Generator, label_dropout: float = 0.0) -> torch.Tensor:
    """MSE between predicted and true velocity for normalised latents x0 (B, *latent_shape); labels (B,) of a
    conditional model are replaced by the null class with probability `label_dropout`."""
    b = x0.shape[0]
    noise = randn(tuple(x0.shape), generator, x0)
    t = sample_r(b, "uniform", generator, x0)  # (B,)
    tb = t.view(-1, *[1] * (x0.ndim - 1))
    x_t = (1 - tb) * x0 + tb * noise
    if labels is not None and label_dropout > 0:
        drop = torch.rand(b, generator=generator, device=generator.device).to(x0.device) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    v = model(x_t, t, labels).float()
    return F.mse_loss(v, noise - x0)


def check_sampling(model: LatentDiT, n: int, steps: int, guidance: float, class_labels=None) -> None:
    """Refuse a sampling request the model cannot serve, naming the argument and its command-line option."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (--n) must be an int >= 1 (the number of samples), got {n!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps (--steps) must be an int in [1, {MAX_STEPS:,}] (the generator's Euler steps), got "
                         f"{steps!r}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance (--cfg) must be a finite number >= 0 (1: no guidance), got {guidance}")
    if not model.conditional:
        if guidance != 1.0 or class_labels is not None:
            raise ValueError("this generator is unconditional (trained with generator.num_classes=0): it takes no "
                             "--class-label and no guidance (--cfg 1); train one with generator.num_classes=K on a "
                             "folder of class subfolders for both")
        return
    if class_labels is None:
        return
    k = model.config.num_classes
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.is_floating_point() or labels.numel() not in (1, n) or ((labels < 0) | (labels >= k)).any():
        raise ValueError(f"class_labels (--class-label) must be one class index, or one per sample, in [0, {k - 1}] "
                         f"(this generator has {k} classes), got {class_labels!r}")


def _labels(model: LatentDiT, n: int, class_labels, generator, device) -> torch.Tensor | None:
    """(n,) labels of a conditional model: `class_labels` (one int for all, or n ints), else drawn uniformly
    from `generator` (a list: each sample's from its own); None for an unconditional model."""
    if not model.conditional:
        return None
    if class_labels is not None:
        return torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(n).to(device)
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    draws = [torch.randint(model.config.num_classes, (n // len(gens),), generator=g, device=g.device) for g in gens]
    return torch.cat(draws).to(device)


@torch.no_grad()
def sample_latents(model: LatentDiT, n: int, steps: int, guidance: float = 1.0, class_labels=None,
                   generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """`n` normalised latents (n, *latent_shape) from noise with `steps` Euler steps and guidance scale
    `guidance` (a conditional model: classes `class_labels`, one int or n ints, else drawn at random).
    `generator`: the source of all randomness (default: seed 0), or a list of n, one per sample, so that a
    sample does not depend on its batch (`msdd.seeding.image_generators`)."""
    check_sampling(model, n, steps, guidance, class_labels)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    weight = next(model.parameters())
    labels = _labels(model, n, class_labels, generator, weight.device)
    x = randn((n, *model.latent_shape), generator, weight)  # (n, *latent_shape) float32 on the model's device
    guided = passes_per_step(guidance) == 2
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])  # (2n,): label, then null
    elif guidance == 0.0:  # the null branch alone
        labels = torch.full_like(labels, model.null_class)
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        x_in = torch.cat([x, x]) if guided else x
        v = model(x_in, x_in.new_full((x_in.shape[0],), t), labels).float()
        if guided:
            v = guide(*v.chunk(2), guidance)
        x = x + (t_next - t) * v
    return x


class Generated(NamedTuple):
    """Samples: the images (n, 3, R, R) in [-1, 1] and the normalised latents they were decoded from."""

    images: torch.Tensor
    latents: torch.Tensor


@torch.no_grad()
def generate(model: LatentDiT, tokenizer, n: int, steps: int, guidance: float = 1.0, class_labels=None,
             generator: torch.Generator | list[torch.Generator] | None = None, decode_steps=None) -> Generated:
    """`sample_latents`, `tokenizer.denormalize_latents`, then `tokenizer.decode` (its default schedule, or
    `decode_steps`) with its noise from the same generator(s): the images and their normalised latents."""
    if model.latent_shape != tuple(tokenizer.config.latent_shape):
        raise ValueError(f"--tokenizer: its latents have shape {tuple(tokenizer.config.latent_shape)}, the generator "
                         f"was trained on {model.latent_shape}; pass the tokenizer the generator was trained with")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    z = sample_latents(model, n, steps, guidance, class_labels, generator)
    images = tokenizer.decode(tokenizer.denormalize_latents(z.to(tokenizer.device)), steps=decode_steps,
                              generator=generator)
    return Generated(images, z)


def generate_images(model: LatentDiT, tokenizer, n: int, steps: int, guidance: float = 1.0, class_labels=None,
                    generator: torch.Generator | list[torch.Generator] | None = None,
                    decode_steps=None, return_latents: bool = False) -> torch.Tensor:
    """`generate`'s images alone (n, 3, R, R) in [-1, 1]. `return_latents=True` is deprecated: `generate` returns
    the images and their latents."""
    out = generate(model, tokenizer, n, steps, guidance, class_labels, generator, decode_steps)
    if return_latents:
        warnings.warn("generate_images(return_latents=True) is deprecated: generate(...) returns the images and "
                      "their latents (a NamedTuple: .images, .latents)", DeprecationWarning, stacklevel=2)
        return out
    return out.images
