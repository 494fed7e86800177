"""Coarse-to-fine sampling (SPEC 6): one pure function for the many-step teacher and the one-step student.

    x ~ N(0, I) at the first stage's resolution
    for each stage s:  N_s Euler steps in the local time r from 1 to 0 (model time tau from the window)
                       then, unless last: nearest x2 upsample and renoise with 2x2 block noise

All randomness comes from the explicit `generator`; the same generator state gives the same output.
Gradients flow through the whole chain when called outside `torch.no_grad()` (the distillation
student). `start=(stage, r, x, noise)` starts part-way (the distillation teacher).

The unit noise a chain carries can be traced (`return_noise`): a straight path keeps the noise of its
start, so a stage ends at (1 - e) content + e N. N_0 is the initial noise; entering stage s,
N_s = (alpha_s e_{s-1} up(N_{s-1}) + beta_s bn_s) / t0_s (unit variance, see path.block_noise).
Subtracting e_s N_s from a stage output leaves its signal part, comparable across two chains that
drew different noise (the distiller's reconstruction loss).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from msdd.flow.path import randn, renoise, upsample_nearest
from msdd.flow.schedule import StageWindow


def guided_velocity(decoder: Callable, x: torch.Tensor, tau: float, z: torch.Tensor, cfg: float) -> torch.Tensor:
    """v = v_null + cfg (v_cond - v_null); both passes as one doubled batch; cfg = 1 is the plain
    conditional pass and cfg = 0 the unconditional one."""
    b = x.shape[0]
    if cfg == 1.0:
        return decoder(x, x.new_full((b,), tau), z)
    if cfg == 0.0:
        return decoder(x, x.new_full((b,), tau), decoder.null_like(z))
    v = decoder(torch.cat([x, x]), x.new_full((2 * b,), tau), torch.cat([z, decoder.null_like(z)]))
    v_cond, v_null = v.chunk(2)
    return v_null + cfg * (v_cond - v_null)


def sample(
    decoder: Callable,
    z: torch.Tensor,
    windows: Sequence[StageWindow],
    steps: Sequence[int],
    *,
    cfg: float = 1.0,
    gamma: float = 1.0 / 3.0,
    generator,
    start: tuple[int, float, torch.Tensor, torch.Tensor] | None = None,
    return_stages: bool = False,
    return_noise: bool = False,
):
    """Decode latents z (B, L, C) to images (B, 3, R, R), approximately in [-1, 1].

    steps: Euler steps per stage (one entry per window). start: (stage index, local time r, x at that
    stage's resolution, the unit noise x carries) to begin part-way; the stages before it are skipped.
    return_stages: also return the image at the end of every stage that ran (progressive previews);
    return_noise: also return the unit noise N_s each of those stage outputs carries.
    Returns x, or (x, stages), or (x, stages, noises).
    """
    if len(steps) != len(windows):
        raise ValueError(f"steps needs one entry per stage ({len(windows)}), got {list(steps)}")
    if any(int(n) < 1 for n in steps):
        raise ValueError(f"every stage needs >= 1 step, got {list(steps)}")
    b = z.shape[0]
    if start is None:
        first, r0 = 0, 1.0
        res = windows[0].resolution
        x = randn((b, 3, res, res), generator, z)
        noise = x
    else:
        first, r0, x, noise = start
    outputs: list[torch.Tensor] = []
    noises: list[torch.Tensor] = []
    for w in windows[first:]:
        if w.index > first:
            x, bn = renoise(x, w, gamma, generator)
            if return_noise:
                prev_end = windows[w.index - 1].t_end
                noise = (w.alpha * prev_end * upsample_nearest(noise) + w.beta * bn) / w.t_start
        n = int(steps[w.index])
        r_start = r0 if w.index == first else 1.0
        rs = [r_start * (1 - i / n) for i in range(n + 1)]  # linearly spaced local times, r_start -> 0
        for r, r_next in zip(rs[:-1], rs[1:]):
            v = guided_velocity(decoder, x, w.tau_at(r), z, cfg)
            x = x + (r_next - r) * v.float()
        outputs.append(x)
        noises.append(noise)
    if return_noise:
        return x, outputs, noises
    return (x, outputs) if return_stages else x
