"""Pieces shared by the stage-1 trainer and the stage-2 distiller: optimiser, LR schedule, EMA,
resumable data order, RNG state capture, logging."""

from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from msdd.config import to_dict
from msdd.data import SkipCounter, build_train_dataset, collate_skip_bad
from msdd.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


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


# ---------------------------------------------------------------------------------------------
# the training loop shared by stage 1 and stage 2


class TrainerBase:
    """Run directory, data stream, resume, checkpoints, logging and the step loop.

    Subclasses build their models and optimisers, then call `self._resume(...)`, and implement
    `train_step(images) -> dict | None` (None: non-finite loss, step skipped), `weights()`,
    `load_weights(w)`, `optim_state()`, `load_optim_state(s)`, `save_grid()` and `finalize()`.
    `settings` is the section of the config with log_every / ckpt_every / grid_every.
    """

    desc = "train"

    def __init__(self, cfg, run_dir, device, batch_size: int, seed: int, settings) -> None:
        self.cfg, self.run_dir, self.device, self.settings = cfg, Path(run_dir), torch.device(device), settings
        dataset = build_train_dataset(cfg.data.source, cfg.model.image_size, seed, cfg.data.limit)
        self.stream = BatchStream(dataset, batch_size, ResumableSampler(len(dataset), seed), collate_skip_bad,
                                  cfg.data.num_workers)
        self.skips = SkipCounter()
        self.gen = torch.Generator(self.device).manual_seed(seed + 1)  # all noise of the objective
        self.step, self.bad_steps, self.skipped_steps = 0, 0, 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._config_json = json.dumps(to_dict(cfg), indent=2)
        self._writer = None

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {"step": self.step, "data": self.stream.state(), "generator": self.gen.get_state(),
                "rng": rng_state(), "skipped_steps": self.skipped_steps, **self.optim_state()}

    def save(self):
        return save_checkpoint(self.run_dir, self.step, self.weights(), self.state(), self._config_json,
                               keep=self.cfg.train.keep_checkpoints)

    def _resume(self, require: bool, check_config) -> None:
        """Continue from the newest intact checkpoint, if any; `check_config(stored_json, path)` raises
        on a mismatch. Writes the run's config.json."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if require:
                raise FileNotFoundError(f"--resume: no intact checkpoint in {self.run_dir / 'checkpoints'}")
        else:
            weights, state, cfg_json = load_checkpoint(path)
            check_config(cfg_json, path)
            self.load_weights(weights)
            self.load_optim_state(state)
            self.stream.load_state(state["data"])
            self.gen.set_state(state["generator"])
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            print(f"resumed from {path} at step {self.step}")
        (self.run_dir / "config.json").write_text(self._config_json + "\n")

    # ------------------------------------------------------------------ loop

    def fit(self, max_steps: int | None = None, minutes: float | None = None, progress: bool = True) -> dict:
        """Train until `max_steps` (default: the config's) or `minutes` of wall time; then save a
        checkpoint, a grid and the final model (`finalize`). Returns a summary."""
        s = self.settings
        max_steps = s.max_steps if max_steps is None else max_steps
        deadline = None if minutes is None else time.monotonic() + 60 * minutes
        bar = tqdm(total=max_steps, initial=self.step, disable=not progress, desc=self.desc, unit="step",
                   dynamic_ncols=True)
        meter, t_start, last = Throughput(), time.monotonic(), {}
        while self.step < max_steps and (deadline is None or time.monotonic() < deadline):
            images, n_skipped, skipped = next(self.stream)
            self.skips.update(n_skipped, skipped)
            if len(images) == 0:
                continue
            out = self.train_step(images.to(self.device, non_blocking=True))
            if out is None:
                self.bad_steps += 1
                self.skipped_steps += 1
                warnings.warn(f"non-finite loss at step {self.step}: step skipped "
                              f"({self.bad_steps} in a row, {self.skipped_steps} in total)")
                if self.bad_steps >= MAX_BAD_STEPS:
                    raise RuntimeError(f"{self.bad_steps} non-finite losses in a row at step {self.step}; stopping. "
                                       f"The last good checkpoint is intact; lower the learning rate or check the data")
                continue
            self.bad_steps = 0
            self.step += 1
            meter.add(len(images))
            bar.update(1)
            last = out
            if self.step % s.log_every == 0:
                out["img_per_s"] = meter.rate()
                self.log(out)
                bar.set_postfix(loss=f"{out['loss']:.4f}", img_s=f"{out['img_per_s']:.1f}")
            if self.step % s.grid_every == 0:
                self.save_grid()
            if self.step % s.ckpt_every == 0:
                self.save()
        bar.close()
        self.save()
        self.save_grid()
        self.finalize()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return {"steps": self.step, "seconds": time.monotonic() - t_start, "last": last,
                "skipped_images": self.skips.count, "skipped_steps": self.skipped_steps}

    # ------------------------------------------------------------------ logging

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when logging starts

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    def log(self, out: dict) -> None:
        for k, v in out.items():
            self.writer.add_scalar(f"{self.desc}/{k}", v, self.step)
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **out}) + "\n")


MAX_BAD_STEPS = 20  # consecutive non-finite losses before a run gives up
