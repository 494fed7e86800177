"""Multi-scale flow-matching path: resampling, block noise, training pairs and the stage-1 loss (SPEC 5).

Within stage s (window w) the straight path between its two noisy ends, with ONE shared noise n,

    x_end_n   = (1 - e_s)  x_end   + e_s  n          x_end   = image at the stage resolution
    x_start_n = (1 - t0_s) x_start + t0_s n          x_start = x_end halved once more, nearest-upsampled
    x_r       = (1 - r) x_end_n + r x_start_n        r in [0, 1] is the local time (r = 1 at the start)

is traversed from r = 1 to r = 0. The network predicts v = x_start_n - x_end_n = dx/dr, so an Euler
step is x <- x + (r_next - r) v and the one-step estimate of the stage end is x_r - r v.
(SPEC writes the step as (t_next - t) v in global time; with the unscaled target that would move only
(t0 - e) of the way, so we integrate in the local time r, which is the same path.)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from msdd.flow.schedule import StageWindow


def randn(shape: tuple[int, ...], generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn from `generator` (on its own device), returned on `like`'s device.

    `generator` may also be a list with one generator per sample: each sample's noise then depends
    only on its own generator, so a decode does not change with batch size or process count."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([randn(tuple(shape[1:]), g, like) for g in generator])
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def downsample(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    """Halve the resolution `times` times. Bilinear halving (align_corners=False) = 2x2 averaging."""
    for _ in range(times):
        x = F.avg_pool2d(x, 2)
    return x


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def block_noise(shape: tuple[int, ...], gamma: float, generator: torch.Generator | None,
                like: torch.Tensor) -> torch.Tensor:
    """Noise with covariance (1 + gamma) I - gamma 11^T inside each 2x2 block, drawn vectorised.

    Why this sign: entering a stage, the nearest-upsampled previous image carries noise that is
    constant over each 2x2 block (covariance sigma^2 11^T). Adding beta * this block noise, with
    beta^2 = alpha^2 sigma^2 / gamma, makes the total noise isotropic with std alpha k sigma = t0,
    exactly the iid noise of the training pairs. (Noise with +gamma 11^T, as SPEC 6 words it, leaves
    the start noise 50% correlated within blocks; a model trained on iid noise then treats the
    correlated part as image content and the decode degrades stage after stage; the README's
    "Block noise sign" has the measured effect.)
    Drawn as sqrt(1 + gamma) (n - m) + sqrt(1 - 3 gamma) m, with m the 2x2 block mean of iid n
    (needs gamma <= 1/3; gamma = 1/3 gives zero-mean blocks).
    """
    n, a, b = _block_parts(shape, gamma, generator, like)
    return _plus_upsampled(n, a, b)


def _block_parts(shape: tuple[int, ...], gamma: float, generator, like: torch.Tensor) -> tuple:
    """block_noise as a n + up(b): the iid draw n, a = sqrt(1 + gamma), and b = (sqrt(1 - 3 gamma) - a) times n's
    2x2 block means (block means: covariance 11^T / 4 within a block)."""
    if gamma > 1.0 / 3.0 + 1e-9:
        raise ValueError(f"block noise needs gamma <= 1/3, got {gamma}")
    n = randn(shape, generator, like)
    a = math.sqrt(1.0 + gamma)
    return n, a, (math.sqrt(max(0.0, 1.0 - 3.0 * gamma)) - a) * F.avg_pool2d(n, 2)


def _plus_upsampled(n: torch.Tensor, a: float, small: torch.Tensor) -> torch.Tensor:
    """a n + upsample_nearest(small) for n (B, C, 2h, 2w) and small (B, C, h, w), in one pass over n."""
    B, C, h, w = small.shape
    return torch.add(small[:, :, :, None, :, None], n.view(B, C, h, 2, w, 2), alpha=a).view(B, C, 2 * h, 2 * w)


def renoise(x: torch.Tensor, window: StageWindow, generator,
            noise: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Enter `window`'s stage: nearest x2 upsample, then x <- alpha x + beta * bn with 2x2 block noise bn
    of the window's gamma. Returns (the new x, bn), bn None unless `noise`. Computed as
    alpha up(x) + beta (a n + up(b)) = beta a n + up(alpha x + beta b) (`_block_parts`): one pass at the new
    resolution instead of nine (two upsamples, the block noise's four elementwise ops, alpha x, beta bn, the sum)."""
    shape = (*x.shape[:-2], 2 * x.shape[-2], 2 * x.shape[-1])
    n, a, b = _block_parts(shape, window.gamma, generator, x)
    out = _plus_upsampled(n, window.beta * a, window.alpha * x + window.beta * b)
    return out, _plus_upsampled(n, a, b) if noise else None


def stage_ends(images: torch.Tensor, window: StageWindow) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean (x_end, x_start) of a stage from full-resolution images (B, 3, R, R)."""
    x_end = downsample(images, int(round(math.log2(images.shape[-1] / window.resolution))))
    x_start = upsample_nearest(downsample(x_end))
    return x_end, x_start


def noisy_at(
    x_end: torch.Tensor, x_start: torch.Tensor, window: StageWindow, r: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The point x_r of the stage path and its velocity target v = x_start_n - x_end_n. r: (B,)."""
    end_n = (1 - window.t_end) * x_end + window.t_end * noise
    start_n = (1 - window.t_start) * x_start + window.t_start * noise
    r4 = r.view(-1, 1, 1, 1).to(x_end.dtype)
    return (1 - r4) * end_n + r4 * start_n, start_n - end_n


def velocity_from_end(x_r: torch.Tensor, x_end: torch.Tensor, window: StageWindow, r: torch.Tensor) -> torch.Tensor:
    """The velocity of the stage path through x_r whose clean end is `x_end` (x-prediction).

    On the path x_r = A x_end + B x_start + c n with A = (1 - r)(1 - e), B = r (1 - t0),
    c = (1 - r) e + r t0 and x_start = up(down(x_end)); an estimate of x_end fixes n, and with it
    v = (1 - t0) x_start - (1 - e) x_end + (t0 - e) n. One Euler step from r to 0 then lands on
    (1 - e) x_end + e n exactly. r: (B,) local times."""
    e, t0 = window.t_end, window.t_start
    r4 = r.view(-1, 1, 1, 1).to(x_r.dtype)
    x_end = x_end.to(x_r.dtype)
    x_start = upsample_nearest(downsample(x_end))
    c = ((1 - r4) * e + r4 * t0).clamp_min(1e-4)
    noise = (x_r - (1 - r4) * (1 - e) * x_end - r4 * (1 - t0) * x_start) / c
    return (1 - t0) * x_start - (1 - e) * x_end + (t0 - e) * noise


def sample_r(n: int, scheme: str, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Local times in (0, 1): logit-normal (sigmoid of N(0, 1)) or uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(randn((n,), generator, like))
    if scheme == "uniform":
        device = generator.device if generator is not None else like.device
        return torch.rand((n,), generator=generator, device=device).to(like.device)
    raise ValueError(f"unknown t_sampling {scheme!r}; expected 'logit_normal' or 'uniform'")


def balanced_stages(batch: int, num_stages: int, generator: torch.Generator | None) -> torch.Tensor:
    """Assign each sample of a batch to a stage: counts differ by at most one, order shuffled."""
    device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(batch, generator=generator, device=device).cpu()
    return torch.arange(batch)[perm] % num_stages


def sigmoid_weight(t: torch.Tensor, bias: float) -> torch.Tensor:
    """Loss weight sigmoid(bias - logSNR(t)) with logSNR = 2 log((1 - t) / t) (Kingma & Gao, 2023)."""
    t = t.clamp(1e-5, 1 - 1e-5)
    return torch.sigmoid(bias - 2 * torch.log((1 - t) / t))


def drop_context(z: torch.Tensor, null_context: torch.Tensor, rate: float, generator) -> torch.Tensor:
    """z (B, L, C) with each sample's latent replaced by the null context with probability `rate` (the
    unconditional passes classifier-free guidance needs)."""
    drop = torch.rand((z.shape[0],), generator=generator, device=generator.device if generator else "cpu") < rate
    return torch.where(drop.to(z.device).view(-1, 1, 1), null_context.expand_as(z), z)


def local_sigmoid_weight(r: torch.Tensor, bias: float) -> torch.Tensor:
    """The reference code's weighting on a stage's local time r: -1/2 dlogSNR/dr * exp(bias) *
    sigmoid(logSNR(r) - bias), logSNR(r) = 2 log((1 - r) / r), so -1/2 dlogSNR/dr = 1 / (r (1 - r))."""
    r = r.clamp(1e-5, 1 - 1e-5)
    return math.exp(bias) * torch.sigmoid(2 * torch.log((1 - r) / r) - bias) / (r * (1 - r))


def flow_loss(
    decoder: Callable,
    images: torch.Tensor,
    z: torch.Tensor,
    windows: tuple[StageWindow, ...],
    *,
    t_sampling: str = "logit_normal",
    loss_weighting: str = "none",
    sigmoid_bias: float = 0.0,
    loss_reduction: str = "stage_sum",
    prediction: str = "v",
    cfg_drop: float = 0.0,
    null_context: torch.Tensor | None = None,
    perceptual: Callable | None = None,
    perceptual_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Stage-1 loss for a batch of images (B, 3, R, R) with latents z (B, L, C).

    Each sample trains one stage (balanced, shuffled assignment); the loss is the sum over stages of
    the mean squared velocity error of that stage's samples (loss_reduction "sample_mean": the mean over
    all samples instead) (prediction "x": the mean squared error of
    `decoder.end_estimate`, the predicted clean stage end, against x_end; no loss weighting), plus,
    when `perceptual` is given, its weighted value between the one-step estimate of the last stage's
    end and x_end_n.
    Returns (loss, {stage index: that stage's loss (detached)}).
    """
    b = images.shape[0]
    if cfg_drop > 0:
        if null_context is None:
            raise ValueError("cfg_drop > 0 needs the decoder's null context")
        z = drop_context(z, null_context, cfg_drop, generator)
    assign = balanced_stages(b, len(windows), generator).to(images.device)
    total = images.new_zeros(())
    per_stage: dict[int, torch.Tensor] = {}
    for w in windows:
        idx = (assign == w.index).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        x_end, x_start = stage_ends(images[idx], w)
        noise = randn(tuple(x_end.shape), generator, x_end)
        r = sample_r(idx.numel(), t_sampling, generator, x_end)
        x_r, target = noisy_at(x_end, x_start, w, r, noise)
        tau = w.tau_at(r)
        if prediction == "x":  # the loss weighting is that of x-space MSE
            x_hat = decoder.end_estimate(x_r, tau, z[idx]).float()
            err = (x_hat - x_end).pow(2).mean(dim=(1, 2, 3))  # (n,)
            v = velocity_from_end(x_r, x_hat, w, r)
        else:
            v = decoder(x_r, tau, z[idx]).float()
            err = (v - target).pow(2).mean(dim=(1, 2, 3))  # (n,)
            if loss_weighting == "sigmoid":
                err = err * sigmoid_weight(w.t_at(r), sigmoid_bias)
            elif loss_weighting == "sigmoid_local":
                err = err * local_sigmoid_weight(r, sigmoid_bias)
            elif loss_weighting == "stage":
                # v carries the stage-end image scaled by (1 - e_s): weigh every stage's content equally
                err = err / (1 - w.t_end) ** 2
        loss = err.mean()
        if perceptual is not None and perceptual_weight > 0 and w.index == len(windows) - 1:
            end_n = (1 - w.t_end) * x_end + w.t_end * noise
            x_hat = x_r - r.view(-1, 1, 1, 1) * v
            loss = loss + perceptual_weight * perceptual(x_hat, end_n).mean()
        per_stage[w.index] = loss.detach()
        total = total + (loss * idx.numel() / b if loss_reduction == "sample_mean" else loss)
    return total, per_stage
