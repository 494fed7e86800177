"""The training loop shared by the stage-1 trainer, the stage-2 distillers and the latent generator's trainer
(`TrainerBase`): processes, micro-batches, resume, checkpoints and logging. The pieces it is built from live
beside it: `optim.py` (optimiser, LR schedule), `ema.py`, `stream.py` (resumable data order), `rng.py` (RNG state
capture), `signals.py` (SIGTERM / SIGINT) and `runlog.py` (log.jsonl, TensorBoard, throughput).

One optimiser step over a global batch of B images, with n processes (torchrun) and A = grad_accum:

    micro-batch slot j = rank * A + a  (j < n A) holds images [j m, (j + 1) m) of the global batch,
                                        m = B / (n A), and draws its noise from a generator seeded by
                                        (seed, attempt, j): which images and which noise a slot gets
                                        does not depend on how the slots are spread over processes
    forward + backward per micro-batch (loss scaled by its share of good images)
    one all-reduce of [good images, non-finite flag, loss sum, skipped files, signal, time up, data dry]
        -> every process takes the same decision: step, skip (non-finite somewhere), or stop
    one all-reduce of the flattened gradients (sum); non-finite anywhere -> skip (the reduced gradients
        are the same on every process, so is this decision); else clip, optimiser, scheduler, EMA

So n processes with A accumulation steps train like n' processes with A' = n A / n' (up to the order
in which gradients are summed). The objective is defined per micro-batch (the flow loss balances its
stages within one), so changing n A changes it slightly.

Gradients are reduced by hand rather than by DistributedDataParallel: the objectives call parts of
their models several times per micro-batch (every stage, a discriminator twice, autograd.grad for
the adaptive weight), accumulate over micro-batches and train two optimisers; a single flat
all-reduce after the last backward is exact for all of that. It does not overlap communication with
the backward pass, which DDP would.
"""

from __future__ import annotations

import json
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset
from tqdm import tqdm

from msdd.config import diff_fields, to_dict
from msdd.data import SkipCounter, build_train_dataset, collate_skip_bad
from msdd.dist import all_gather_object, all_reduce_sum, barrier, broadcast_object, broadcast_tensors, setup
from msdd.train.checkpoint import (
    CheckpointError, _step_dir, check_writable, latest_checkpoint, load_checkpoint, save_checkpoint,
)  # fmt: skip
from msdd.train.rng import rng_state, set_rng_state
from msdd.train.runlog import RunLog, Throughput
from msdd.train.signals import StopSignals
from msdd.train.stream import BatchStream, ResumableSampler


def _weighted_means(outs: list[tuple[int, dict]]) -> dict:
    """Per key, the mean over micro-batches weighted by their image counts (keys may be missing in some); `outs`
    of every process (`all_gather_object`), so that the logged parts of the loss are the global batch's."""
    total, weight = {}, {}
    for n, out in (o for process in all_gather_object(outs) for o in process):
        for k, v in out.items():
            total[k], weight[k] = total.get(k, 0.0) + n * v, weight.get(k, 0) + n
    return {k: total[k] / weight[k] for k in total}


# ---------------------------------------------------------------------------------------------
# the training loop shared by stage 1 and stage 2


# Fields that may change between a run and its resumption without changing what is computed.
RESUME_FREE_FIELDS = ("train.log_every", "train.ckpt_every", "train.grid_every", "train.keep_checkpoints",
                      "train.compile", "data.num_workers", "name")


def check_resume_config(stored, requested, where: Path, free=RESUME_FREE_FIELDS) -> None:
    """Refuse to resume a run whose stored config differs from the requested one outside `free`, listing the
    fields (stage 1 and the latent generator; the distillers check what they read, `distiller.check_resume`)."""
    diffs = [d for d in diff_fields(stored, requested) if not d.startswith(free)]
    if diffs:
        raise ValueError(f"cannot resume {where}: its config differs from the requested one in "
                         f"{len(diffs)} field(s):\n  " + "\n  ".join(diffs)
                         + "\nuse the original settings, or start a new run directory")


class TrainerBase:
    """Run directory, data stream, resume, checkpoints, logging and the step loop, in one process or
    under torchrun / SLURM (see the module docstring for one step).

    Subclasses build their models and optimisers, then call `self._resume(...)`, and implement
    `trained_parameters()` (whose gradients are reduced over processes), `micro_step(images, generator)
    -> (loss, metrics)` (the forward pass of one micro-batch; `loss` is backpropagated),
    `optimizer_step() -> metrics` (clip, step, schedule, EMA), `weights()`, `load_weights(w)`,
    `optim_state()`, `load_optim_state(s)`, `save_grid()` and `finalize()`; `synced_buffers()` and
    `train_dataset()` if needed.
    `section` names the config section with batch_size, grad_accum, log_every, ckpt_every, grid_every
    and max_steps; a checkpoint's manifest records the mean of `checkpoint_metric` since the previous one.
    Only rank 0 writes files (logs, checkpoints, grids, the final model); the run directory must be
    on a file system that every process can read (for resuming).
    """

    desc, section, checkpoint_metric = "train", "train", "loss"

    def __init__(self, cfg, run_dir, device, seed: int) -> None:
        self.dist, self.device = setup(device)
        self.settings = settings = getattr(cfg, self.section)
        rank, world = self.dist.rank, self.dist.world_size
        if settings.batch_size % (world * settings.grad_accum):
            raise ValueError(f"{self.section}.batch_size={settings.batch_size} (the global batch) must be divisible by "
                             f"processes x {self.section}.grad_accum = {world} x {settings.grad_accum}")
        self.micro = settings.batch_size // (world * settings.grad_accum)
        self.cfg, self.run_dir, self.seed = cfg, Path(run_dir), seed
        self._on_main(lambda: check_writable(self.run_dir))  # creates it
        dataset = self.train_dataset(rank, world)
        sampler = None if isinstance(dataset, IterableDataset) else \
            ResumableSampler(len(dataset), seed, rank, world, settings.batch_size)
        self.stream = BatchStream(dataset, self.micro, sampler, collate_skip_bad, cfg.data.num_workers)
        self.skips = SkipCounter()  # this process's skipped files, with examples
        if self.dist.is_main:  # files of the source left out before training (embedded+FOLDER's unusable photos)
            left_out = getattr(dataset, "left_out", [])
            self.skips.update(len(left_out), left_out)
        self.step, self.bad_steps, self.skipped_steps, self.skipped_images = 0, 0, 0, 0
        self.train_seconds, self._fit_t0 = 0.0, None  # wall time of fit() calls, kept across resumes
        self._saved_step, self._since_saved = None, []  # newest checkpoint's step; checkpoint_metric values since
        self._saved_seconds = 0.0  # the training time the newest checkpoint holds
        self._config_json = json.dumps(to_dict(cfg), indent=2)
        self.run_log = RunLog(self.run_dir, self.desc)

    def train_dataset(self, rank: int, world: int):
        """The records `(tensor or None, name, reason)` the data stream batches: the images of data.source; a
        trainer on other tensors overrides it (the latent generator: indices of its encoded latents)."""
        cfg = self.cfg
        return build_train_dataset(cfg.data.source, cfg.model.image_size, self.seed, cfg.data.limit, rank, world)

    def _on_main(self, fn):
        """fn() on rank 0 only; its result on every process, or its CheckpointError raised on every process
        (raised on rank 0 alone, it would leave the others waiting in the next collective)."""
        out = None
        if self.dist.is_main:
            try:
                out = fn()
            except CheckpointError as e:
                out = e
        out = broadcast_object(out)
        if isinstance(out, CheckpointError):
            raise out
        return out

    def generator(self, a: int) -> torch.Generator:
        """All randomness of micro-batch a's objective: seeded by (seed, attempt, slot rank * A + a), so it
        needs no checkpointing and a slot draws the same noise whatever the number of processes."""
        slot = self.dist.rank * self.settings.grad_accum + a
        seed = np.random.SeedSequence([self.seed, self.step + self.skipped_steps, slot]).generate_state(1, np.uint64)
        return torch.Generator(self.device).manual_seed(int(seed[0]))

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """Everything but the weights. Collective: holds every process's data position and RNG states."""
        return {"step": self.step, "world_size": self.dist.world_size,
                "data": all_gather_object(self.stream.state()), "rng": all_gather_object(rng_state()),
                "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images,
                "train_seconds": self._elapsed(), **self.optim_state()}

    def _elapsed(self) -> float:
        """Seconds spent in fit() up to now, over every run that led to this state."""
        return self.train_seconds + (time.monotonic() - self._fit_t0 if self._fit_t0 is not None else 0.0)

    def save(self) -> Path | None:
        """A checkpoint of the current step (written by rank 0; every process must call this)."""
        state, path = self.state(), None
        if self.dist.is_main:
            loss = sum(self._since_saved) / len(self._since_saved) if self._since_saved else None
            path = save_checkpoint(self.run_dir, self.step, self.weights(), state, self._config_json,
                                   keep=self.cfg.train.keep_checkpoints, loss=loss)
        barrier()
        self._saved_step, self._saved_seconds, self._since_saved = self.step, state["train_seconds"], []
        return path

    def _resume(self, require: bool, check_config, fresh=None) -> None:
        """Continue from the newest intact checkpoint (chosen by rank 0), if any; `check_config(stored_json,
        path)` raises on a mismatch; `fresh()`, if given, runs instead when there is none (a new run).
        Checkpoints that are all damaged are a CheckpointError, not a new run. Every process then holds
        rank 0's weights. Writes config.json."""
        path = self._on_main(lambda: latest_checkpoint(self.run_dir))
        if path is None:
            if require:
                raise FileNotFoundError(f"--resume: no intact checkpoint in {self.run_dir / 'checkpoints'}")
            self._on_main(self._start_afresh)
            if fresh is not None:
                fresh()
        else:
            weights, state, cfg_json = load_checkpoint(path)
            check_config(cfg_json, path)
            if state["world_size"] != self.dist.world_size:
                raise ValueError(f"cannot resume {path}: it was written by {state['world_size']} process(es), this run "
                                 f"has {self.dist.world_size}; the data order and random states are per process, "
                                 f"so resume with {state['world_size']}")
            self.load_weights(weights)
            self.load_optim_state(state)
            self.stream.load_state(state["data"][self.dist.rank])
            set_rng_state(state["rng"][self.dist.rank])
            self.step, self._saved_step = int(state["step"]), int(state["step"])
            self.skipped_steps, self.skipped_images = int(state["skipped_steps"]), int(state["skipped_images"])
            self.train_seconds = self._saved_seconds = float(state.get("train_seconds", 0.0))
            if self.dist.is_main:
                self.run_log.continue_from(self.step)
                print(f"resumed from {path} at step {self.step}")
        broadcast_tensors([t for w in self.weights().values() for t in w.values()])
        if self.dist.is_main:
            (self.run_dir / "config.json").write_text(self._config_json + "\n")

    def _start_afresh(self) -> None:
        """A run directory without checkpoints: a new run, unless it holds a model (its checkpoints were deleted,
        and training from step 0 would overwrite it); log lines of a run killed before its first checkpoint go."""
        if (self.run_dir / "model").exists():
            raise CheckpointError(f"{self.run_dir} holds a model but no checkpoint to continue from; training from "
                                  f"step 0 would overwrite {self.run_dir / 'model'}. To train again, move that folder "
                                  "away or choose a new --run-dir")
        self.run_log.continue_from(0)

    # ------------------------------------------------------------------ one step

    def train_step(self, images: torch.Tensor) -> dict | None:
        """One optimiser step on `images` as a single micro-batch (no data stream): metrics, or None
        when the loss or the gradients were not finite (nothing changed)."""
        return self._step([images])[0]

    def _step(self, batches: list[torch.Tensor], skipped: int = 0, signum: int = 0,
              time_up: bool = False, dry: bool = False) -> tuple[dict | None, dict]:
        """Forward and backward over this process's micro-batches, then one decision taken by every
        process from the summed flags. Returns (metrics, or None when no step was taken; the flags)."""
        params = self.trained_parameters()
        for p in params:
            p.grad = None
        n_good, bad, loss_sum, outs = 0, 0, 0.0, []
        for a, images in enumerate(batches):
            if len(images) == 0 or bad:
                continue
            loss, out = self.micro_step(images.to(self.device, non_blocking=True), self.generator(a))
            if not torch.isfinite(loss):
                bad = 1
                continue
            (loss * (len(images) / self.micro)).backward()  # weight = this micro-batch's share of good images
            n_good, loss_sum = n_good + len(images), loss_sum + loss.item() * len(images)
            outs.append((len(images), out))
        term, inter = signum == signal.SIGTERM, signum == signal.SIGINT  # which signal, if any process got one
        wide = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        flags = torch.tensor([n_good, bad, loss_sum, skipped, term, inter, time_up, dry], dtype=wide,
                             device=self.device)
        n, bad, loss_sum, skipped, term, inter, time_up, dry = all_reduce_sum(flags).tolist()
        info = {"images": int(n), "bad": bad > 0, "bad_grads": False, "skipped": int(skipped),
                "signal": "SIGTERM" if term else "SIGINT" if inter else None, "time_up": time_up > 0,
                "dry": int(dry) == self.dist.world_size}
        broadcast_tensors(self.synced_buffers())
        if bad or not n:
            return None, info
        self._reduce_grads(params, self.micro / n)
        if not _grads_finite(params):  # a finite loss can still have inf / NaN gradients: skip like a bad loss
            for p in params:
                p.grad = None
            return None, {**info, "bad": True, "bad_grads": True}
        return {"loss": loss_sum / n, **_weighted_means(outs), **self.optimizer_step()}, info

    def synced_buffers(self) -> list[torch.Tensor]:
        """Buffers that training forward passes update (e.g. spectral-norm power iterations): every
        process takes rank 0's at each step, as DistributedDataParallel's broadcast_buffers does."""
        return []

    def _reduce_grads(self, params: list[nn.Parameter], scale: float) -> None:
        """Sum gradients over processes in one flat all-reduce, then multiply by `scale`. A parameter
        keeps grad None only if it has none on every process."""
        if self.dist.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=self.device)
            flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads] + [has]))
            offset = 0
            for p, present in zip(params, flat[-len(params):].tolist()):
                p.grad = flat[offset : offset + p.numel()].view_as(p) if present else None
                offset += p.numel()
        if scale != 1:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)

    # ------------------------------------------------------------------ loop

    def fit(self, max_steps: int | None = None, minutes: float | None = None, progress: bool = True) -> dict:
        """Train until `max_steps` (default: the config's) or `minutes` of wall time, then save a
        checkpoint, a grid and the final model (`finalize`). SIGTERM / SIGINT stop early: a checkpoint
        is written and the summary says `interrupted` (no final model). Returns a summary (`last`: the metrics of
        the last step trained, or of the last logged step where this call trained none)."""
        settings, main = self.settings, self.dist.is_main
        max_steps = settings.max_steps if max_steps is None else max_steps
        if self.step > max_steps and main:
            warnings.warn(f"this run is already at step {self.step}, past max_steps {max_steps}: nothing to train; "
                          f"its model is written from step {self.step}", stacklevel=2)
        deadline = None if minutes is None else time.monotonic() + 60 * minutes
        bar = tqdm(total=max_steps, initial=self.step, disable=not (progress and main), desc=self.desc,
                   unit="step", dynamic_ncols=True)
        meter, t_start, last, stop = Throughput(), time.monotonic(), self.run_log.last() if main else {}, None
        self._fit_t0 = t_start
        with StopSignals() as signals:
            while self.step < max_steps and stop is None:
                batches, skipped = [], 0
                for _ in range(settings.grad_accum):
                    images, n_skipped, items = next(self.stream)
                    self.skips.update(n_skipped, items)
                    batches.append(images)
                    skipped += n_skipped
                time_up = main and deadline is not None and time.monotonic() > deadline
                out, info = self._step(batches, skipped, signals.received, time_up, self.stream.dry)
                self.skipped_images += info["skipped"]
                if info["signal"] or info["time_up"]:  # a process's signal stops every process, with its exit code
                    stop = signal.Signals(signals.received).name if signals.received else info["signal"] or "time"
                if info["bad"]:
                    self.bad_steps += 1
                    self.skipped_steps += 1
                    if main:
                        warnings.warn(f"non-finite {'gradients' if info['bad_grads'] else 'loss'} at step "
                                      f"{self.step}: step skipped ({self.bad_steps} in a row, "
                                      f"{self.skipped_steps} in total)")
                    if self.bad_steps >= MAX_BAD_STEPS:
                        raise RuntimeError(f"{self.bad_steps} non-finite losses or gradients in a row at step "
                                           f"{self.step}; stopping without saving. {self._newest_checkpoint()}")
                    continue
                if out is None:  # not one usable image in the whole global batch
                    if info["dry"]:
                        path, reason = self.stream.example or ("?", "?")
                        raise ValueError(f"not one usable image in a whole pass over the training data "
                                         f"{self.cfg.data.source}: every file was skipped, e.g. {path}: {reason}; "
                                         f"fix or replace the files, or point data.source elsewhere")
                    continue
                self.bad_steps = 0
                self.step += 1
                self._since_saved.append(out[self.checkpoint_metric])
                meter.add(info["images"])
                bar.update(1)
                last = out = {**out, "skipped_images": self.skipped_images}
                if self.step % settings.log_every == 0:
                    out["img_per_s"] = meter.rate()
                    if main:
                        self.run_log.write(self.step, out)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", img_s=f"{out['img_per_s']:.1f}")
                if self.step % settings.grid_every == 0 and main:
                    self.save_grid()
                if self.step % settings.ckpt_every == 0:
                    self.save()
            bar.close()
            if self._saved_step != self.step:
                self.save()
        skips = SkipCounter.combined(all_gather_object(self.skips))
        # the training time the final checkpoint holds (not the few ms of writing it after): a resumed run
        # continues from exactly this figure
        self.train_seconds, self._fit_t0 = self._saved_seconds, None
        summary = {"steps": self.step, "seconds": self.train_seconds, "seconds_this_run": time.monotonic() - t_start,
                   "last": last,
                   "skipped_images": self.skipped_images, "skipped_examples": skips.examples,
                   "skipped_steps": self.skipped_steps, "interrupted": stop if stop not in (None, "time") else None}
        if main:
            print(f"data: {skips.summary()}")
        if summary["interrupted"]:
            if main:
                print(f"stopped by {stop} at step {self.step}: checkpoint written to "
                      f"{self.run_dir / 'checkpoints'}; run the same command again to continue")
        elif main:
            self.save_grid()
            self.finalize()
        barrier()
        self.run_log.close()
        return summary

    def _newest_checkpoint(self) -> str:
        """Where a run stopped by bad steps can continue from: the checkpoint it saved or resumed from, if any
        (not "the last good checkpoint" of a run that never wrote one)."""
        if self._saved_step is None:
            return (f"No checkpoint has been written to {self.run_dir / 'checkpoints'}, so there is nothing to "
                    f"continue from; lower the learning rate or check the data, and start again")
        return (f"The newest checkpoint is {_step_dir(self.run_dir, self._saved_step)} (step {self._saved_step}); "
                f"lower the learning rate or check the data, then run again to continue from it")


def _grads_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


MAX_BAD_STEPS = 20  # consecutive non-finite losses or gradients before a run gives up
