"""The exponential moving average of a model's weights that every trainer keeps and saves."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    With `warmup` the decay ramps up as min(decay, (1 + n) / (10 + n)) so that short runs are not dominated
    by the random initialisation; the ramp stays below 0.9999 for 90,000 updates. Without it the average
    uses `decay` from the first update and keeps the starting weights' share decay**n, as the reference's
    stage 2 does with a student that starts as the teacher."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                ema_params[name].lerp_(p.detach(), 1 - d)
        for (_, b_ema), (_, b) in zip(self.module.named_buffers(), model.named_buffers()):
            b_ema.copy_(b)
