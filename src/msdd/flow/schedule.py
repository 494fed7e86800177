"""Stage windows of the multi-scale flow (SPEC 5), computed from gamma and the number of stages, and the
per-stage time grid of the sampler.

Time convention (stated once for the whole package): t = 1 is pure noise, t = 0 is data.

Stage s = 0..S-1 works at resolution R / 2^(S-1-s) and moves a noisy image from its start time
`t_start` (t0_s) down to its end time `t_end` (e_s):

    sigma_s = 1 - s/S                       original start noise level, e_s = 1 - (s+1)/S (0 at the end)
    alpha_s = 1 / (k sigma_s + 1 - sigma_s) renoise coefficients on entering stage s > 0,
    beta_s  = alpha_s sigma_s / sqrt(gamma) with k = sqrt(1 + 1/gamma)
    t0_s    = 1 - alpha_s (1 - sigma_s)     "rectified" start: the noise level after renoising

Entering stage s the previous image (at time e_{s-1} = sigma_s, half resolution) is nearest-upsampled
and renoised, x <- alpha_s x + beta_s * block_noise; its per-pixel noise std becomes
alpha_s k sigma_s = t0_s. The model does not see t but a "model time" tau in [1, 0] that is split
across stages in proportion to each stage's length (t0_s - e_s).

Within a stage we use a local fraction r in [1, 0] (r = 1 at t0_s, r = 0 at e_s):
t = e_s + r (t0_s - e_s), tau = tau_end + r (tau_start - tau_end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StageWindow:
    index: int
    resolution: int
    t_start: float  # t0_s
    t_end: float  # e_s
    tau_start: float
    tau_end: float
    alpha: float  # renoise signal coefficient on entry (1.0 for stage 0: no renoise)
    beta: float  # renoise noise coefficient on entry (0.0 for stage 0)
    gamma: float  # block-noise parameter of the renoise (the same for every window of a schedule)

    # the global times at local time r in [0, 1] (1: the stage's start); r a float or a tensor of them
    def t_at(self, r):
        return self.t_end + r * (self.t_start - self.t_end)

    def tau_at(self, r):
        return self.tau_end + r * (self.tau_start - self.tau_end)

    def r_of_tau(self, tau: float) -> float:
        return (tau - self.tau_end) / (self.tau_start - self.tau_end)


def stage_windows(num_stages: int, image_size: int, gamma: float = 1.0 / 3.0) -> tuple[StageWindow, ...]:
    """All stage windows for S = `num_stages` stages ending at `image_size` pixels."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if not 0.0 < gamma <= 1.0 / 3.0 + 1e-9:  # the renoise's block noise needs 1 - 3 gamma >= 0
        raise ValueError(f"gamma must be in (0, 1/3], got {gamma}")
    S = num_stages
    k = math.sqrt(1.0 + 1.0 / gamma)
    starts, ends, alphas, betas = [], [], [], []
    for s in range(S):
        sigma = 1.0 - s / S
        if s == 0:
            alpha, beta, t0 = 1.0, 0.0, 1.0
        else:
            alpha = 1.0 / (k * sigma + 1.0 - sigma)
            beta = alpha * sigma / math.sqrt(gamma)
            t0 = 1.0 - alpha * (1.0 - sigma)
        starts.append(t0)
        ends.append(1.0 - (s + 1) / S)
        alphas.append(alpha)
        betas.append(beta)
    ends[-1] = 0.0
    lengths = [a - b for a, b in zip(starts, ends)]
    total = sum(lengths)
    windows, tau = [], 1.0
    for s in range(S):
        tau_end = 0.0 if s == S - 1 else tau - lengths[s] / total
        windows.append(
            StageWindow(
                index=s,
                resolution=image_size // 2 ** (S - 1 - s),
                t_start=starts[s],
                t_end=ends[s],
                tau_start=tau,
                tau_end=tau_end,
                alpha=alphas[s],
                beta=betas[s],
                gamma=gamma,
            )
        )
        tau = tau_end
    return tuple(windows)


def local_times(steps: int, r_start: float = 1.0) -> list[float]:
    """The Euler grid of one stage: steps + 1 linearly spaced local times from r_start down to 0."""
    return [r_start * (1 - i / steps) for i in range(steps + 1)]


def stage_of_tau(windows: tuple[StageWindow, ...], tau: float) -> int:
    """Index of the stage whose tau window contains `tau` (windows are half-open: (tau_end, tau_start])."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    for w in windows:
        if tau > w.tau_end:
            return w.index
    return windows[-1].index
