"""Coarse-to-fine sampling (SPEC 6): one pure function for the many-step teacher and the one-step student.

    x ~ N(0, I) at the first stage's resolution
    for each stage s:  unless first: nearest x2 upsample and renoise with 2x2 block noise (the window's gamma)
                       N_s Euler steps on the local time grid r from 1 to 0 (model time tau from the window)

All randomness comes from the explicit `generator`; the same generator state gives the same output.
Gradients flow through the whole chain when called outside `torch.no_grad()` (the distillation
student). `start=(stage, r, x, noise)` starts part-way (the distillation teacher).

The unit noise a chain carries is traced alongside: a straight path keeps the noise of its
start, so a stage ends at (1 - e) content + e N. N_0 is the initial noise; entering stage s,
N_s = (alpha_s e_{s-1} up(N_{s-1}) + beta_s bn_s) / t0_s (unit variance, see path.block_noise).
Subtracting e_s N_s from a stage output leaves its signal part, comparable across two chains that
drew different noise (the distiller's reconstruction loss).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from msdd.flow.path import randn, renoise, upsample_nearest
from msdd.flow.schedule import StageWindow, local_times


class SampleResult(NamedTuple):
    """One decode: the final image (B, 3, R, R), the image at the end of every stage that ran (progressive
    previews), and the unit noise N_s each of those stage outputs carries."""

    image: torch.Tensor
    stages: list[torch.Tensor]
    noises: list[torch.Tensor]


def passes_per_step(guidance: float) -> int:
    """Network passes per sample of one guided Euler step: 2 (the conditional and the null pass, one doubled
    batch) under guidance; 1 at guidance 1 (the conditional pass alone) and 0 (the null pass alone)."""
    return 1 if guidance in (0.0, 1.0) else 2


def guide(v_cond: torch.Tensor, v_null: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v_null + guidance (v_cond - v_null)."""
    return v_null + guidance * (v_cond - v_null)


def guided_velocity(decoder: Callable, x: torch.Tensor, tau: float, z: torch.Tensor,
                    guidance: float) -> torch.Tensor:
    """v = v_null + guidance (v_cond - v_null) (classifier-free guidance, the paper's cfg); both passes as
    one doubled batch; guidance 1 is the plain conditional pass and 0 the unconditional one."""
    b = x.shape[0]
    if guidance == 1.0:
        return decoder(x, x.new_full((b,), tau), z)
    if guidance == 0.0:
        return decoder(x, x.new_full((b,), tau), decoder.null_like(z))
    v = decoder(torch.cat([x, x]), x.new_full((2 * b,), tau), torch.cat([z, decoder.null_like(z)]))
    return guide(*v.chunk(2), guidance)


def denoise_stage(decoder: Callable, x: torch.Tensor, z: torch.Tensor, window: StageWindow,
                  times: Sequence[float], guidance: float) -> torch.Tensor:
    """Euler steps x <- x + (r_next - r) v of one stage along its local times `times` (decreasing to 0)."""
    for r, r_next in zip(times[:-1], times[1:]):
        v = guided_velocity(decoder, x, window.tau_at(r), z, guidance)
        x = x + (r_next - r) * v.float()
    return x


def sample_multiscale(
    decoder: Callable,
    z: torch.Tensor,
    windows: Sequence[StageWindow],
    steps: Sequence[int],
    *,
    guidance: float = 1.0,
    generator,
    start: tuple[int, float, torch.Tensor, torch.Tensor] | None = None,
    noises: bool = True,
) -> SampleResult:
    """Decode latents z (B, L, C) to images (B, 3, R, R), approximately in [-1, 1].

    steps: Euler steps per stage (one entry per window). start: (stage index, local time r, x at that
    stage's resolution, the unit noise x carries) to begin part-way; the stages before it are skipped
    and absent from the result's lists. noises: False leaves the result's noises empty (a decode that needs the
    images alone skips tracing them).
    """
    if len(steps) != len(windows):
        raise ValueError(f"steps needs one entry per stage ({len(windows)}), got {list(steps)}")
    if any(int(n) < 1 for n in steps):
        raise ValueError(f"every stage needs >= 1 step, got {list(steps)}")
    if start is None:
        res = windows[0].resolution
        first, r0 = 0, 1.0
        x = randn((z.shape[0], 3, res, res), generator, z)
        noise = x
    else:
        first, r0, x, noise = start
    stages: list[torch.Tensor] = []
    traced: list[torch.Tensor] = []
    for w in windows[first:]:
        if w.index > first:
            x, bn = renoise(x, w, generator, noises)
            if noises:
                prev_end = windows[w.index - 1].t_end
                noise = (w.alpha * prev_end * upsample_nearest(noise) + w.beta * bn) / w.t_start
        times = local_times(int(steps[w.index]), r0 if w.index == first else 1.0)
        x = denoise_stage(decoder, x, z, w, times, guidance)
        stages.append(x)
        if noises:
            traced.append(noise)
    return SampleResult(x, stages, traced)
