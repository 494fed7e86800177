"""The optimiser and learning-rate schedule of both training stages: AdamW with an optional slower
(or frozen) parameter group, linear warm-up then cosine decay."""

from __future__ import annotations

import math

import torch


def make_optimizer(params, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0, slow=(),
                   slow_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable `params`; those also in `slow` train at lr * slow_scale (0: frozen)."""
    slow_ids = {id(p) for p in slow}
    fast = [p for p in params if p.requires_grad and id(p) not in slow_ids]
    slow = [p for p in slow if p.requires_grad]
    if slow and slow_scale == 0:
        for p in slow:
            p.requires_grad_(False)
        slow = []
    groups = [{"params": fast}] + ([{"params": slow, "lr": lr * slow_scale}] if slow else [])
    devices = {p.device.type for p in fast + slow}
    # PyTorch's fused AdamW where it has one (CPU, CUDA): one pass over each tensor's memory instead of about ten,
    # the per-tensor loop that is PyTorch's default on the CPU (benchmarks/README.md, "Training step")
    fused = {"fused": True} if devices and devices <= {"cpu", "cuda"} else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **fused)


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr, then cosine decay to min_ratio x base at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
