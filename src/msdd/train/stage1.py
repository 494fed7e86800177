"""Stage 1: train the encoder and the decoder jointly: the multi-scale flow (SPEC 5), or the loss of
another model family (`Tokenizer.training_loss`: SSDD's single-scale flow + LPIPS + REPA, or the plain
autoencoder's MSE).

A run directory holds everything about one run and is all that is needed to continue it:

    <run>/config.json      the resolved config          <run>/checkpoints/   resumable states
    <run>/tb/              TensorBoard scalars          <run>/grids/         reconstruction grids
    <run>/log.jsonl        one line per logged step     <run>/model/         final EMA tokenizer

Starting a trainer on a run directory that has checkpoints continues from the newest intact one
(a config that differs in a field that matters is refused, listing the fields).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from msdd.config import Config, config_from_json, diff_fields
from msdd.data import build_eval_images, build_train_dataset, collate_skip_bad
from msdd.eval.grid import save_grid
from msdd.models.compiling import compile_blocks
from msdd.tokenizer import Tokenizer, autocast, synchronize
from msdd.train.ema import EMA
from msdd.train.loop import RESUME_FREE_FIELDS, TrainerBase, check_resume_config
from msdd.train.optim import cosine_schedule, make_optimizer
from msdd.weights import build_loss_network, unused_file


def load_init_weights(tok: Tokenizer, source: str) -> list[str]:
    """Copy a trained model's weights (encoder, decoder, latent statistics) into `tok` to fine-tune it.
    Returns the model config fields that differ (training settings such as the loss weighting may, and a
    refiner may be added: it starts as the identity); a model whose weights do not fit is an error naming
    those fields."""
    src = Tokenizer.from_pretrained(source)
    differ = diff_fields(src.config, tok.config, "model")
    state = src.state_dict()
    if getattr(tok.decoder, "refiner", None) is not None and src.config.refiner_width == 0:
        # a refiner added to a model trained without one starts as the identity (its own zero init)
        state.update({f"decoder.refiner.{k}": v for k, v in tok.decoder.refiner.state_dict().items()})
    try:
        tok.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ValueError(f"train.init_from={source}: its weights do not fit this model ({detail}); model fields "
                         f"that differ:\n  " + "\n  ".join(differ or ["(none)"])
                         + "\nuse the preset it was trained with (see its config.json), or drop train.init_from"
                         ) from None
    return differ


def linear_path_parameters(tok: Tokenizer) -> list[torch.nn.Parameter]:
    """The linear path's two maps (model.linear_path), trained at lr * train.linear_lr_scale (0: frozen)."""
    if not tok.config.uses_linear_path:
        return []
    return [*tok.encoder.to_linear.parameters(), *tok.decoder.from_linear.parameters()]


class Stage1Trainer(TrainerBase):
    desc = "stage1"

    def __init__(self, cfg: Config, run_dir: str | Path, device: str | torch.device = "cpu",
                 perceptual: torch.nn.Module | None = None, require_resume: bool = False,
                 vgg_weights: str | Path | None = None, dinov2_weights: str | Path | None = None,
                 repa: torch.nn.Module | None = None) -> None:
        tc, mc = cfg.train, cfg.model
        super().__init__(cfg, run_dir, device, tc.seed)
        torch.manual_seed(tc.seed)
        self.tok = Tokenizer(mc).to(self.device)
        self.ema = EMA(self.tok, tc.ema_decay, tc.ema_warmup)
        if tc.compile:  # the trained model only: the EMA (grids, the saved model) decodes on msdd's inference path
            compile_blocks(self.tok, self.device)
        self.opt = make_optimizer(self.tok.parameters(), tc.lr, tc.betas, tc.weight_decay,
                                  slow=linear_path_parameters(self.tok), slow_scale=tc.linear_lr_scale)
        self.sched = cosine_schedule(self.opt, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        self.perceptual, self.repa = perceptual, repa
        for message in self.tok.family.inert_settings:
            warnings.warn(message, stacklevel=2)
        lpips_field, lpips_weight = self.tok.family.lpips_setting
        if lpips_weight > 0 and perceptual is None:
            from msdd.models.perceptual import LPIPS

            self.perceptual = build_loss_network(lambda: LPIPS(vgg_weights), self.device,
                                                 f"{lpips_field}={lpips_weight}; set it to 0 to train without LPIPS")
        repa_field, repa_weight = self.tok.family.repa_setting
        if repa_weight > 0 and repa is None:
            from msdd.models.repa import DinoV2Features

            self.repa = build_loss_network(lambda: DinoV2Features(dinov2_weights), self.device,
                                           f"{repa_field}={repa_weight}; set it to 0 to train without REPA")
        if lpips_weight == 0:
            unused_file("--vgg-weights", vgg_weights, f"{lpips_field}=0 (no LPIPS loss)")
        if repa_weight == 0:
            unused_file("--dinov2-weights", dinov2_weights, f"{repa_field}=0 (no REPA loss)" if repa_field
                        else f"the {mc.family} family has no REPA loss")
        self.eval_images = build_eval_images(cfg.data.eval_source, mc.image_size, limit=8)[0]
        # stage 2 settings do not affect stage 1; a resumed run continues from its checkpoint, not init_from
        free = RESUME_FREE_FIELDS + ("distill.", "train.init_from")
        self._resume(require_resume, lambda js, path: check_resume_config(config_from_json(js), cfg, path, free),
                     fresh=self._fresh_start)

    def _fresh_start(self) -> None:
        """A new run: start from train.init_from, or set the linear path from a PCA of training crops."""
        if self.cfg.train.init_from:
            self._init_from()
        elif self.cfg.model.uses_linear_path and self.dist.is_main:  # the others receive rank 0's weights
            from msdd.eval.baselines import training_crops
            from msdd.models.linear import fit_pca

            tc, mc = self.cfg.train, self.cfg.model
            t0 = time.monotonic()
            crops = training_crops(self.cfg.data.source, mc.image_size, tc.pca_crops, seed=tc.seed + 11)
            k = mc.latent_tokens * mc.latent_dim
            if len(crops) < k:
                raise ValueError(f"model.linear_path starts from a PCA with {k} components, but data.source="
                                 f"{self.cfg.data.source} gave only {len(crops)} training crops; add images, raise "
                                 f"train.pca_crops, or set model.linear_path=false")
            self.tok.init_linear_path(fit_pca(crops, k, seed=tc.seed))
            self.ema.module.load_state_dict(self.tok.state_dict())
            print(f"linear path: PCA of {len(crops)} training crops ({time.monotonic() - t0:.0f} s)")

    def _init_from(self) -> None:
        """A new fine-tuning run: start model and EMA from `train.init_from`."""
        source = self.cfg.train.init_from
        differ = load_init_weights(self.tok, source)
        self.ema.module.load_state_dict(self.tok.state_dict())
        if self.dist.is_main:
            print(f"train.init_from={source}: starting from its weights"
                  + ("; model settings that differ from it (this run uses the new ones):\n  " + "\n  ".join(differ)
                     if differ else ""))

    # ------------------------------------------------------------------ TrainerBase hooks

    def weights(self) -> dict:
        return {"model": self.tok.state_dict(), "ema": self.ema.module.state_dict()}

    def load_weights(self, w: dict) -> None:
        self.tok.load_state_dict(w["model"])
        self.ema.module.load_state_dict(w["ema"])

    def optim_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "ema_updates": self.ema.updates}

    def load_optim_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema.updates = int(state["ema_updates"])

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.tok.parameters() if p.requires_grad]

    def micro_step(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        self.tok.train()
        with autocast(self.device, self.cfg.train.bf16):
            loss, terms = self.tok.training_loss(images, generator, perceptual=self.perceptual, repa=self.repa)
        return loss, {k: v.item() for k, v in terms.items()}

    def optimizer_step(self) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.tok)
        return {"grad_norm": grad_norm.item(), "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def save_grid(self) -> Path:
        """real | end of every stage (EMA model, default schedule) for a few fixed evaluation images."""
        tok, images = self.ema.module, self.eval_images.to(self.device)
        with autocast(self.device, self.cfg.train.bf16):
            z = tok.encoder(images).float()
            _, stages = tok.sample(z, tok.default_steps(), tok.resolve_guidance(None),
                                   torch.Generator(self.device).manual_seed(0))
        return save_grid([images, *stages], self.run_dir / "grids" / f"step_{self.step:08d}.png",
                         labels=["real", *(f"{s.shape[-1]} px" for s in stages)])

    def finalize(self) -> Path:
        """Latent statistics over training crops, then the EMA tokenizer to <run>/model."""
        tok = self.ema.module
        dataset = build_train_dataset(self.cfg.data.source, self.cfg.model.image_size, seed=self.cfg.train.seed + 7,
                                      limit=512)
        mean, std = compute_latent_stats(tok, dataset)
        tok.latent_mean.copy_(mean)
        tok.latent_std.copy_(std)
        tok.save_pretrained(self.run_dir / "model", stage=1, steps_trained=self.step)
        return self.run_dir / "model"


@torch.no_grad()
def compute_latent_stats(tok: Tokenizer, dataset, batch_size: int = 64, max_images: int = 512):
    """Per-channel mean and std of z over up to `max_images` images of `dataset`."""
    total, total_sq, n, seen, skipped, example = 0.0, 0.0, 0, 0, 0, None  # example: a skipped (path, reason)
    for images, n_skipped, bad in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_bad):
        skipped, example = skipped + n_skipped, example or (bad[0] if bad else None)
        images = images[: max_images - seen]  # never more than max_images in all
        if len(images) == 0:
            continue
        z = tok.encoder(images.to(tok.device)).float()
        z = z.movedim(1, -1).flatten(0, -2) if tok.config.spatial_latent else z.flatten(0, 1)  # (B*positions, C)
        total, total_sq, n, seen = total + z.sum(0), total_sq + z.pow(2).sum(0), n + z.shape[0], seen + len(images)
        if seen >= max_images:
            break
    if n == 0:
        e_g = f", e.g. {example[0]}: {example[1]}" if example else ""
        raise ValueError(f"no usable images to compute latent statistics from ({skipped} skipped{e_g}); "
                         "give data with usable images (`msdd latent-stats --data`, data.source)")
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.cpu(), std.cpu()


def measure_step_time(cfg: Config, steps: int = 5, warmup: int = 2, device: str | torch.device = "cpu") -> float:
    """Median seconds of a stage-1 training step for `cfg` on random images, on a throwaway model: the trainer's
    step (forward, backward, gradient clipping, AdamW with the linear path's group as configured, EMA) without its
    data stream and LPIPS / REPA networks, so that it needs no files. With `train.compile` the blocks are compiled as
    the trainer's, and the warm-up steps compile them (their time is not counted). Used to size time-budgeted runs
    and by `msdd info --step-time`."""
    device, tc = torch.device(device), cfg.train
    tok = Tokenizer(cfg.model).to(device)
    opt = make_optimizer(tok.parameters(), tc.lr, tc.betas, tc.weight_decay, slow=linear_path_parameters(tok),
                         slow_scale=tc.linear_lr_scale)
    ema = EMA(tok, tc.ema_decay, tc.ema_warmup)
    if tc.compile:
        compile_blocks(tok, device)
    params = [p for p in tok.parameters() if p.requires_grad]
    g = torch.Generator(device).manual_seed(0)
    r = cfg.model.image_size
    images = torch.rand(cfg.train.batch_size, 3, r, r, generator=g, device=device) * 2 - 1
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast(device, cfg.train.bf16):
            loss, _ = tok.training_loss(images, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        ema.update(tok)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
