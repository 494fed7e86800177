"""Pieces shared by the stage-1 trainer and the stage-2 distiller: optimiser, LR schedule, EMA,
resumable data order, RNG state capture, logging."""

from __future__ import annotations

import copy
import math
import random
import time
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler


def make_optimizer(params, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr, then cosine decay to min_ratio x base at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) so that short runs are not dominated by the
    random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                ema_params[name].lerp_(p.detach(), 1 - d)
        for (_, b_ema), (_, b) in zip(self.module.named_buffers(), model.named_buffers()):
            b_ema.copy_(b)


class ResumableSampler(Sampler[int]):
    """A shuffled index order per epoch that can start mid-epoch and be sharded across ranks.

    Epoch e's order is a permutation drawn from (seed, e); rank k of n takes every n-th index. The
    position (indices already consumed by this rank) is all a checkpoint needs to continue exactly."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        per_rank = self.size // self.world_size  # equal shares so every rank runs the same number of steps
        return perm[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.size // self.world_size - self.start)


class BatchStream:
    """Endless batches over epochs with a resumable position: (epoch, batches taken this epoch)."""

    def __init__(self, dataset, batch_size: int, sampler: ResumableSampler, collate_fn, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.epoch, self.batches_in_epoch = 0, 0
        self._it = None
        if len(sampler) < batch_size:
            raise ValueError(f"the training set has {sampler.size} images, fewer than one batch of {batch_size} per "
                             f"process; lower train.batch_size or add images")

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        self._it = None

    def _start_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch, self.batches_in_epoch * self.batch_size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                            collate_fn=self.collate_fn, num_workers=self.num_workers,
                            persistent_workers=False)
        self._it = iter(loader)

    def __next__(self):
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
                self.batches_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch, self.batches_in_epoch, self._it = self.epoch + 1, 0, None

    def __iter__(self):
        return self


def rng_state() -> dict:
    """Global RNG states in a form `torch.load(weights_only=True)` accepts (tensors and lists only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def generator_state(g: torch.Generator) -> torch.Tensor:
    return g.get_state()


class Throughput:
    """Images per second over the last logging window."""

    def __init__(self) -> None:
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        r = self.n / dt if dt > 0 else 0.0
        self.t0, self.n = time.perf_counter(), 0
        return r
