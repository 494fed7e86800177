"""Step budgets of the two training stages: fixed step counts (the demo's), or step counts sized to
minutes of wall time from a measured step time, with warm-up, checkpoint and grid intervals scaled to
them, so that the LR schedule completes within the budget. Used by `msdd demo` and `msdd fidelity`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from msdd.config import Config
from msdd.train.distill import measure_distill_step_time
from msdd.train.stage1 import measure_step_time


DEMO_STAGE1_STEPS = 900
DEMO_DISTILL_STEPS = 250


def fixed_steps(cfg: Config, stage1: int = DEMO_STAGE1_STEPS, distill: int = DEMO_DISTILL_STEPS) -> Config:
    """The demo's schedule: fixed step counts (warm-up, checkpoints and grids scaled to them)."""
    train = replace(cfg.train, max_steps=stage1, warmup_steps=min(cfg.train.warmup_steps, stage1 // 10),
                    ckpt_every=max(50, stage1 // 6), grid_every=max(50, stage1 // 4))
    dist = replace(cfg.distill, max_steps=distill, warmup_steps=min(cfg.distill.warmup_steps, distill // 10),
                   ckpt_every=max(50, distill // 5), grid_every=max(50, distill // 2))
    return replace(cfg, train=train, distill=dist)


def budgeted_config(cfg: Config, stage1_minutes: float, device: str) -> tuple[Config, float]:
    """Fit train.max_steps (and warm-up) to a wall-time budget from a measured step time, so the LR
    schedule completes within the budget."""
    step_s = measure_step_time(cfg, device=device)
    steps = max(10, int(stage1_minutes * 60 / step_s * 0.95))
    train = replace(cfg.train, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10),
                    ckpt_every=max(50, steps // 10), grid_every=max(50, steps // 5))
    return replace(cfg, train=train), step_s


def budgeted_distill(cfg: Config, teacher: Path, minutes: float, device: str) -> tuple[Config, float]:
    step_s = measure_distill_step_time(cfg, teacher, device=device)
    steps = max(10, int(minutes * 60 / step_s * 0.95))
    distill = replace(cfg.distill, max_steps=steps, warmup_steps=min(cfg.distill.warmup_steps, steps // 10),
                      ckpt_every=max(50, steps // 10), grid_every=max(50, steps // 5))
    return replace(cfg, distill=distill), step_s
