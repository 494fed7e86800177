"""The single-scale flow of the SSDD family (SPEC 10): training loss and sampler.

Same time convention as the rest of the package: t = 1 is noise, t = 0 is data.

    x_t = (1 - t) x + t n        n ~ N(0, I), t logit-normal (sigmoid of N(0, 1)) or uniform
    v   = n - x                  the network predicts v (MSE on v); the one-step estimate of x is x_t - t v
                                 (or, with ssdd.prediction x, predicts x_hat: MSE on x_hat, v = (x_t - x_hat) / t)
    sampling: t_i = (1 - i/N)^shift for i = 0..N (shift > 1 spends more steps near the data), Euler
              steps x <- x + (t_{i+1} - t_i) v from pure noise; N = 1 is the one-step student's decode

Losses: flow matching MSE, plus LPIPS of the one-step estimate against the image and REPA (cosine
alignment of projected bottleneck tokens with frozen DINOv2 patch features), each when its weight is > 0.
No classifier-free guidance: reconstruction is conditioned on a latent that determines the image
almost completely, and the single-step student is distilled without guidance (SPEC 7's best student
uses cfg 1 too), so the family keeps no null latent.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from msdd.flow.path import randn, sample_r


def time_schedule(steps: int, shift: float) -> list[float]:
    """t_i = (1 - i/N)^shift, i = 0..N: from 1 (noise) to 0 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [(1.0 - i / steps) ** shift for i in range(steps + 1)]


def sample_ssdd(decoder: Callable, z: torch.Tensor, steps: int, shift: float, *, generator=None,
                noise: torch.Tensor | None = None, image_size: int | None = None) -> torch.Tensor:
    """Decode latents z to images (B, 3, R, R), approximately in [-1, 1], with `steps` Euler steps.

    The start noise is `noise` if given, else drawn from `generator` (a generator or a list with one per
    sample, see `msdd.flow.path.randn`). Differentiable when called outside `torch.no_grad()`."""
    if noise is None:
        r = image_size or decoder.image_size
        noise = randn((z.shape[0], 3, r, r), generator, z)
    x = noise
    ts = time_schedule(steps, shift)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = decoder(x, x.new_full((x.shape[0],), t), z)
        x = x + (t_next - t) * v.float()
    return x


def repa_loss(feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between projected decoder tokens (B, g*g, D) and DINOv2 patch features
    (B, G*G, D); the decoder's grid is resized (bilinear, antialiased) to DINOv2's."""
    g, big = round(feats.shape[1] ** 0.5), round(target.shape[1] ** 0.5)
    f = feats.float().transpose(1, 2).reshape(feats.shape[0], -1, g, g)  # (B, D, g, g)
    if g != big:
        f = F.interpolate(f, size=(big, big), mode="bilinear", align_corners=False, antialias=g > big)
    f = f.flatten(2).transpose(1, 2)  # (B, G*G, D)
    return 1 - F.cosine_similarity(f, target.float(), dim=-1).mean()


def ssdd_loss(
    decoder: Callable,
    images: torch.Tensor,
    z: torch.Tensor,
    *,
    t_sampling: str = "logit_normal",
    perceptual: Callable | None = None,
    lpips_weight: float = 0.0,
    repa: Callable | None = None,
    repa_weight: float = 0.0,
    generator=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 loss of the SSDD family for images (B, 3, R, R) and their latents z.
    Returns (loss, {term name: its value (detached)})."""
    b = images.shape[0]
    noise = randn(tuple(images.shape), generator, images)
    t = sample_r(b, t_sampling, generator, images)  # (B,)
    t4 = t.view(-1, 1, 1, 1)
    x_t = (1 - t4) * images + t4 * noise
    use_repa = repa is not None and repa_weight > 0
    if getattr(decoder, "prediction", "v") == "x":  # MSE on the image estimate (x-space weighting)
        out = decoder.end_estimate(x_t, t, z, return_features=use_repa)
        x_hat, feats = out if use_repa else (out, None)
        l_fm = (x_hat - images).pow(2).mean()
        loss, terms = l_fm, {"loss_x": l_fm.detach()}
    else:
        out = decoder.network(x_t, t, z, return_features=use_repa)
        v, feats = out if use_repa else (out, None)
        v = v.float()
        x_hat = x_t - t4 * v  # one-step estimate of the image
        l_fm = (v - (noise - images)).pow(2).mean()
        loss, terms = l_fm, {"loss_fm": l_fm.detach()}
    if perceptual is not None and lpips_weight > 0:
        l_lpips = perceptual(x_hat, images).mean()
        loss = loss + lpips_weight * l_lpips
        terms["loss_lpips"] = l_lpips.detach()
    if use_repa:
        with torch.no_grad():
            target = repa(images)  # (B, G*G, D) frozen DINOv2 patch features of the clean images
        l_repa = repa_loss(feats, target)
        loss = loss + repa_weight * l_repa
        terms["loss_repa"] = l_repa.detach()
    return loss, terms
