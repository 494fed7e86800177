"""Stage 1: train the encoder and the multi-scale flow decoder jointly (SPEC 5).

A run directory holds everything about one run and is all that is needed to continue it:

    <run>/config.json      the resolved config          <run>/checkpoints/   resumable states
    <run>/tb/              TensorBoard scalars          <run>/grids/         reconstruction grids
    <run>/log.jsonl        one line per logged step     <run>/model/         final EMA tokenizer

Starting a trainer on a run directory that has checkpoints continues from the newest intact one
(a config that differs in a field that matters is refused, listing the fields).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from msdd.config import Config, config_from_json, diff_fields, to_dict
from msdd.data import SkipCounter, build_eval_images, build_train_dataset, collate_skip_bad
from msdd.eval.grid import save_grid
from msdd.flow.path import flow_loss
from msdd.flow.sampler import sample
from msdd.tokenizer import Tokenizer, autocast
from msdd.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from msdd.train.loop import (
    EMA, BatchStream, ResumableSampler, Throughput, cosine_schedule, make_optimizer, rng_state, set_rng_state,
)  # fmt: skip

# Fields that may change between a run and its resumption without changing what is computed.
RESUME_FREE_FIELDS = ("train.log_every", "train.ckpt_every", "train.grid_every", "train.keep_checkpoints",
                      "data.num_workers", "name", "distill.")
MAX_BAD_STEPS = 20  # consecutive non-finite losses before giving up


def check_resume_config(stored: Config, requested: Config, where: Path) -> None:
    diffs = [d for d in diff_fields(stored, requested) if not d.startswith(RESUME_FREE_FIELDS)]
    if diffs:
        raise ValueError(f"cannot resume {where}: its config differs from the requested one in "
                         f"{len(diffs)} field(s):\n  " + "\n  ".join(diffs)
                         + "\nuse the original settings, or start a new run directory")


class Stage1Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, device: str | torch.device = "cpu",
                 perceptual: torch.nn.Module | None = None, require_resume: bool = False) -> None:
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), torch.device(device)
        tc, mc = cfg.train, cfg.model
        torch.manual_seed(tc.seed)
        self.tok = Tokenizer(mc).to(self.device)
        self.ema = EMA(self.tok, tc.ema_decay)
        self.opt = make_optimizer(self.tok.parameters(), tc.lr, tc.betas, tc.weight_decay)
        self.sched = cosine_schedule(self.opt, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        self.perceptual = perceptual
        if mc.flow.lpips_weight > 0 and perceptual is None:
            from msdd.models.perceptual import LPIPS  # fails with the documented message if VGG16 is absent

            try:
                self.perceptual = LPIPS().to(self.device)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}\n(model.flow.lpips_weight={mc.flow.lpips_weight}; set it to 0 to "
                                        f"train without LPIPS)") from None
        dataset = build_train_dataset(cfg.data.source, mc.image_size, tc.seed, cfg.data.limit)
        self.stream = BatchStream(dataset, tc.batch_size, ResumableSampler(len(dataset), tc.seed),
                                  collate_skip_bad, cfg.data.num_workers)
        self.skips = SkipCounter()
        self.gen = torch.Generator(self.device).manual_seed(tc.seed + 1)  # flow noise, t, stage assignment
        self.step, self.bad_steps, self.skipped_steps = 0, 0, 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._resume(require_resume)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        self._writer = None

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "ema_updates": self.ema.updates,
            "data": self.stream.state(),
            "generator": self.gen.get_state(),
            "rng": rng_state(),
            "skipped_steps": self.skipped_steps,
        }

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir, self.step,
            {"model": self.tok.state_dict(), "ema": self.ema.module.state_dict()},
            self.state(), json.dumps(to_dict(self.cfg), indent=2), keep=self.cfg.train.keep_checkpoints,
        )

    def _resume(self, require: bool) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if require:
                raise FileNotFoundError(f"--resume: no intact checkpoint in {self.run_dir / 'checkpoints'}")
            return
        weights, state, cfg_json = load_checkpoint(path)
        check_resume_config(config_from_json(cfg_json), self.cfg, path)
        self.tok.load_state_dict(weights["model"])
        self.ema.module.load_state_dict(weights["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema.updates = int(state["ema_updates"])
        self.stream.load_state(state["data"])
        self.gen.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ training

    def train_step(self, images: torch.Tensor) -> dict | None:
        """One optimisation step; None if the loss was not finite (step skipped, weights untouched)."""
        tc, fc = self.cfg.train, self.cfg.model.flow
        self.tok.train()
        with autocast(self.device, tc.bf16):
            z = self.tok.encoder(images)
            loss, per_stage = flow_loss(
                self.tok.decoder, images, z, self.tok.windows,
                t_sampling=fc.t_sampling, loss_weighting=fc.loss_weighting, sigmoid_bias=fc.sigmoid_bias,
                cfg_drop=fc.cfg_drop, null_context=self.tok.decoder.null_context,
                perceptual=self.perceptual, perceptual_weight=fc.lpips_weight, generator=self.gen,
            )
        if not torch.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            return None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.tok.parameters(), tc.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.tok)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": self.sched.get_last_lr()[0],
                **{f"loss_stage{s}": v.item() for s, v in per_stage.items()}}

    def fit(self, max_steps: int | None = None, minutes: float | None = None, progress: bool = True) -> dict:
        """Train until `max_steps` (default: train.max_steps) or `minutes` of wall time, then save the
        final checkpoint and the EMA model to <run>/model. Returns a summary."""
        tc = self.cfg.train
        max_steps = tc.max_steps if max_steps is None else max_steps
        deadline = None if minutes is None else time.monotonic() + 60 * minutes
        eval_images = build_eval_images(self.cfg.data.eval_source, self.cfg.model.image_size, limit=8)[0]
        bar = tqdm(total=max_steps, initial=self.step, disable=not progress, desc="stage 1", unit="step",
                   dynamic_ncols=True)
        meter, t_start, last = Throughput(), time.monotonic(), {}
        while self.step < max_steps and (deadline is None or time.monotonic() < deadline):
            images, n_skipped, skipped = next(self.stream)
            self.skips.update(n_skipped, skipped)
            if len(images) == 0:
                continue
            images = images.to(self.device, non_blocking=True)
            out = self.train_step(images)
            if out is None:
                self.bad_steps += 1
                self.skipped_steps += 1
                warnings.warn(f"non-finite loss at step {self.step}: step skipped "
                              f"({self.bad_steps} in a row, {self.skipped_steps} in total)")
                if self.bad_steps >= MAX_BAD_STEPS:
                    raise RuntimeError(f"{self.bad_steps} non-finite losses in a row at step {self.step}; stopping. "
                                       f"The last good checkpoint is intact; lower train.lr or check the data")
                continue
            self.bad_steps = 0
            self.step += 1
            meter.add(len(images))
            bar.update(1)
            last = out
            if self.step % tc.log_every == 0:
                out["img_per_s"] = meter.rate()
                self._log(out)
                bar.set_postfix(loss=f"{out['loss']:.4f}", img_s=f"{out['img_per_s']:.1f}")
            if self.step % tc.grid_every == 0:
                self.save_grid(eval_images)
            if self.step % tc.ckpt_every == 0:
                self.save()
        bar.close()
        self.save()
        self.save_grid(eval_images)
        self.finalize()
        if self._writer is not None:
            self._writer.close()
        return {"steps": self.step, "seconds": time.monotonic() - t_start, "last": last,
                "skipped_images": self.skips.count, "skipped_steps": self.skipped_steps}

    # ------------------------------------------------------------------ outputs

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    def _log(self, out: dict) -> None:
        for k, v in out.items():
            self.writer.add_scalar(f"train/{k}", v, self.step)
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **out}) + "\n")

    @torch.no_grad()
    def save_grid(self, images: torch.Tensor) -> Path:
        """real | end of every stage (EMA model, default schedule) for a few fixed evaluation images."""
        tok = self.ema.module
        images = images.to(self.device)
        with autocast(self.device, self.cfg.train.bf16):
            z = tok.encoder(images).float()
            _, stages = sample(tok.decoder, z, tok.windows, tok.default_steps(), cfg=tok.config.sampling.cfg,
                               gamma=tok.config.flow.gamma, generator=torch.Generator(self.device).manual_seed(0),
                               return_stages=True)
        return save_grid([images, *stages], self.run_dir / "grids" / f"step_{self.step:08d}.png")

    def finalize(self) -> Path:
        """Latent statistics over training crops, then the EMA tokenizer to <run>/model."""
        tok = self.ema.module
        stats = compute_latent_stats(tok, build_train_dataset(self.cfg.data.source, self.cfg.model.image_size,
                                                              seed=self.cfg.train.seed + 7, limit=512))
        tok.latent_mean.copy_(stats[0])
        tok.latent_std.copy_(stats[1])
        tok.save_pretrained(self.run_dir / "model", stage=1, steps_trained=self.step)
        return self.run_dir / "model"


@torch.no_grad()
def compute_latent_stats(tok: Tokenizer, dataset, batch_size: int = 64, max_images: int = 512):
    """Per-channel mean and std of z over up to `max_images` images of `dataset`."""
    from torch.utils.data import DataLoader

    total, total_sq, n = 0.0, 0.0, 0
    for images, _, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_bad):
        if len(images) == 0:
            continue
        z = tok.encoder(images.to(tok.device)).float().flatten(0, 1)  # (B*L, C)
        total, total_sq, n = total + z.sum(0), total_sq + z.pow(2).sum(0), n + z.shape[0]
        if n >= max_images * tok.config.latent_tokens:
            break
    if n == 0:
        raise ValueError("no usable images to compute latent statistics from")
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.cpu(), std.cpu()


def measure_step_time(cfg: Config, steps: int = 3, warmup: int = 1, device: str | torch.device = "cpu") -> float:
    """Median seconds of a stage-1 training step (forward, backward, AdamW) for `cfg` on random
    images, on a throwaway model. Used to size time-budgeted runs and by `msdd info`."""
    device = torch.device(device)
    tok = Tokenizer(cfg.model).to(device)
    opt = make_optimizer(tok.parameters(), cfg.train.lr, cfg.train.betas)
    g = torch.Generator(device).manual_seed(0)
    r, fc = cfg.model.image_size, cfg.model.flow
    images = torch.rand(cfg.train.batch_size, 3, r, r, generator=g, device=device) * 2 - 1
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast(device, cfg.train.bf16):
            loss, _ = flow_loss(tok.decoder, images, tok.encoder(images), tok.windows, t_sampling=fc.t_sampling,
                                cfg_drop=fc.cfg_drop, null_context=tok.decoder.null_context, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
