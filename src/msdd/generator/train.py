"""`msdd gen-train`: the latent generator trained with flow matching (`msdd.generator.flow`) on a frozen
tokenizer's normalised latents, by the shared training loop (`msdd.train.loop.TrainerBase`: processes,
resume, atomic checkpoints, progress, TensorBoard).

    <run>/config.json  log.jsonl  tb/  checkpoints/   as for `msdd train`
    <run>/grids/       samples of the EMA generator, decoded by the tokenizer
    <run>/model/       the final EMA generator (`msdd.generator.files`)

The training images are encoded once when the trainer starts (`msdd.generator.data`: each process encodes
its share and all get the whole set; a resumed run encodes the same ones again). Resuming refuses another
tokenizer (its weights' sha256 is in every checkpoint) and a config that differs in a field that changes what
is computed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from msdd.config.dicts import from_dict, to_dict
from msdd.dist import setup
from msdd.generator.config import GenRunConfig
from msdd.generator.data import LatentRecords, encode_latents
from msdd.generator.files import png_bytes, sample_grid, save_generator
from msdd.generator.flow import flow_matching_loss, generate_images
from msdd.generator.model import build_generator
from msdd.hub import WEIGHTS_NAME, file_sha256, latent_space_sha256, resolve_model_dir
from msdd.io import atomic_write_bytes
from msdd.tokenizer import Tokenizer, autocast
from msdd.train.ema import EMA
from msdd.train.loop import RESUME_FREE_FIELDS, TrainerBase, check_resume_config
from msdd.train.optim import cosine_schedule, make_optimizer

GRID_SAMPLES, GRID_STEPS = 16, 25  # the training grids: samples of the EMA generator, Euler steps, no guidance


class GeneratorTrainer(TrainerBase):
    """The generator (`cfg.generator`) on the latents of `tokenizer` (a model directory, bundled name or
    Hub repo id): its step, grid and saved model; the loop is the base's."""

    desc = "gen"

    def __init__(self, cfg: GenRunConfig, tokenizer: str | Path, run_dir: str | Path,
                 device: str | torch.device = "cpu", require_resume: bool = False) -> None:
        tc = cfg.train
        info, device = setup(device)  # this process's device, before the tokenizer is loaded onto it
        self.tokenizer_source = str(tokenizer)
        self.tokenizer = Tokenizer.from_pretrained(tokenizer, device=device).requires_grad_(False)
        self.tokenizer_hash = file_sha256(resolve_model_dir(tokenizer) / WEIGHTS_NAME)
        t0 = time.monotonic()
        self.data = encode_latents(self.tokenizer, cfg.data, tc.seed, cfg.generator.num_classes, tc.bf16,
                                   rank=info.rank, world=info.world_size)
        super().__init__(cfg, run_dir, device, tc.seed)
        if self.dist.is_main:
            shared = f" in {info.world_size} processes" if info.world_size > 1 else ""
            print(f"encoded {len(self.data.latents)} latents {tuple(self.data.latents.shape[1:])} of data.source="
                  f"{cfg.data.source} ({time.monotonic() - t0:.1f} s{shared})")
        torch.manual_seed(tc.seed)
        self.model = build_generator(cfg.generator, self.tokenizer.config.latent_shape).to(self.device)
        self.ema = EMA(self.model, tc.ema_decay, tc.ema_warmup)
        self.opt = make_optimizer(self.model.parameters(), tc.lr, tc.betas, tc.weight_decay)
        self.sched = cosine_schedule(self.opt, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        self._resume(require_resume, lambda js, path: check_resume_config(
            from_dict(GenRunConfig, json.loads(js)), cfg, path, RESUME_FREE_FIELDS))

    def train_dataset(self, rank: int, world: int) -> LatentRecords:
        return LatentRecords(len(self.data.latents))

    # ------------------------------------------------------------------ TrainerBase hooks

    def weights(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict()}

    def load_weights(self, w: dict) -> None:
        self.model.load_state_dict(w["model"])
        self.ema.module.load_state_dict(w["ema"])

    def optim_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "ema_updates": self.ema.updates, "tokenizer_sha256": self.tokenizer_hash}

    def load_optim_state(self, state: dict) -> None:
        if state["tokenizer_sha256"] != self.tokenizer_hash:
            raise ValueError(f"cannot resume {self.run_dir}: it was trained on another tokenizer's latents (weights "
                             f"sha256 {state['tokenizer_sha256'][:12]}..., --tokenizer {self.tokenizer_source} has "
                             f"{self.tokenizer_hash[:12]}...); pass that tokenizer, or start a new run directory")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema.updates = int(state["ema_updates"])

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def micro_step(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """`rows`: indices of this micro-batch's latents (`LatentRecords`)."""
        self.model.train()
        rows = rows.cpu()
        x0 = self.data.latents[rows].to(self.device)  # (B, *latent_shape)
        labels = None if self.data.labels is None else self.data.labels[rows].to(self.device)
        with autocast(self.device, self.cfg.train.bf16):
            loss = flow_matching_loss(self.model, x0, labels, generator, self.cfg.train.label_dropout)
        return loss, {}

    def optimizer_step(self) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model)
        return {"grad_norm": grad_norm.item(), "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def save_grid(self) -> Path:
        """`GRID_SAMPLES` samples of the EMA generator (classes 0, 1, ... when conditional), seed 0, decoded."""
        model = self.ema.module
        labels = torch.arange(GRID_SAMPLES) % model.config.num_classes if model.conditional else None
        images = generate_images(model, self.tokenizer, GRID_SAMPLES, GRID_STEPS, 1.0, labels,
                                 torch.Generator(self.device).manual_seed(0))
        path = self.run_dir / "grids" / f"step_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, png_bytes(sample_grid(images)))
        return path

    def finalize(self) -> Path:
        """The EMA generator to <run>/model, with the tokenizer it learnt from and its class names."""
        return save_generator(self.ema.module, self.run_dir / "model", tokenizer=self.tokenizer_source,
                              tokenizer_sha256=self.tokenizer_hash,
                              latent_space_sha256=latent_space_sha256(self.tokenizer),
                              class_names=self.data.class_names, steps_trained=self.step,
                              train=to_dict(self.cfg.train), data=to_dict(self.cfg.data))
