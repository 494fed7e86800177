"""Where a multi-scale decode gains and loses fidelity: the content of every stage, measured.

A stage s ends at (1 - e_s) x_s + e_s N_s, with x_s the image at that stage's resolution and N_s the
unit noise the chain carries (traced by the sampler). Its *signal* part (out - e_s N_s) / (1 - e_s) is
the stage's estimate of x_s. For every stage this reports its PSNR against the real image averaged
down to the stage resolution, and the PSNR of that estimate averaged further down to the first
stage's resolution: the coarse content. A decoder that only adds detail keeps the coarse PSNR from
stage to stage; a drop shows a later stage re-inferring (and losing) low frequencies.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from msdd.eval.metrics import psnr_per_image
from msdd.flow.path import downsample
from msdd.flow.sampler import sample_multiscale
from msdd.tokenizer import Tokenizer


@torch.no_grad()
def stage_fidelity(
    tok: Tokenizer,
    images: torch.Tensor,
    steps: int | Sequence[int] | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> list[dict]:
    """Per-stage fidelity of decoding `images` (N, 3, R, R) in [-1, 1] with a multi-scale model.

    Returns one dict per stage: stage, resolution, noise_level (e_s), psnr (signal part vs the image at
    the stage resolution) and coarse_psnr (both averaged down to the first stage's resolution); PSNR
    means over the images, in dB on [0, 1]. The last stage has e = 0, so its psnr is the decode's PSNR.
    """
    if not tok.family.multi_scale:
        raise ValueError(f"stage_fidelity needs a multi-scale (msdd) model, got family {tok.config.family!r}")
    steps, guidance = tok.resolve_steps(steps), tok.resolve_guidance(guidance)
    x = tok.prepare_images(images)
    z = tok.encode(x)
    generator = torch.Generator().manual_seed(seed)
    _, outputs, noises = sample_multiscale(tok.decoder, z, tok.windows, steps, guidance=guidance, generator=generator)
    first = tok.windows[0].resolution
    rows = []
    for w, out, noise in zip(tok.windows, outputs, noises):
        estimate = ((out.float() - w.t_end * noise) / (1 - w.t_end)).clamp(-1, 1)  # estimate of x at this stage
        truth = downsample(x, int(math.log2(x.shape[-1] // w.resolution)))
        to_first = int(math.log2(w.resolution // first))
        rows.append({
            "stage": w.index, "resolution": w.resolution, "noise_level": round(w.t_end, 4),
            "psnr": psnr_per_image(estimate, truth).mean().item(),
            "coarse_psnr": psnr_per_image(downsample(estimate, to_first), downsample(truth, to_first)).mean().item(),
        })
    return rows
