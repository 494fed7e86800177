"""What both stage-2 distillers share (`DistillerBase`): the frozen teacher, the student and its EMA, the
optional LPIPS and discriminator, the optimisers, the teacher's hash, resume checks and the saved student.

A distiller for one model family subclasses it and adds only its step (`micro_step`) and its grid
(`save_grid`): `msdd.train.distill.Distiller` (multi-scale teachers, with a discriminator) and
`msdd.train.distill_ssdd.SSDDDistiller` (SSDD teachers, GAN-free).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from msdd.config import Config, ModelConfig, config_from_json, diff_fields, to_dict
from msdd.data import build_eval_images
from msdd.dist import setup
from msdd.eval.grid import save_grid
from msdd.hub import file_sha256, read_model_metadata, resolve_model_dir
from msdd.models.compiling import compile_blocks
from msdd.models.discriminator import build_discriminator
from msdd.tokenizer import Tokenizer
from msdd.train.ema import EMA
from msdd.train.loop import TrainerBase
from msdd.train.optim import cosine_schedule, make_optimizer
from msdd.weights import build_loss_network, unused_file

# The config a distillation computes with: these sections and fields. The other train.* fields configure
# stage 1 only (tests/test_faults.py finds every train field the distillers' code reads and checks that
# changing it is refused). Within them, the cadence of logs and checkpoints, the loader's workers and compiling
# may change on resume: they do not change what is computed (compiling: up to rounding).
READS = ("model", "data", "distill", "train.seed", "train.bf16", "train.betas", "train.grad_clip",
         "train.linear_lr_scale", "train.min_lr_ratio")
CADENCE = ("distill.log_every", "distill.ckpt_every", "distill.grid_every", "data.num_workers", "distill.compile")
# read too, and free to change on resume (how many checkpoints the shared loop keeps)
READ_ANY_TIME = ("train.keep_checkpoints",)


def check_resume(stored: Config, requested: Config, where: str | Path = "this run") -> None:
    """Refuse to resume a distillation whose stored config differs from the requested one in a field the
    distillers read (`READS` less `CADENCE`), listing those fields."""

    def matters(diff: str) -> bool:
        name = diff.split(":", 1)[0]
        return any(name == r or name.startswith(r + ".") for r in READS) and name not in CADENCE

    diffs = [d for d in diff_fields(stored, requested) if matters(d)]
    if diffs:
        raise ValueError(f"cannot resume {where}: its config differs in {len(diffs)} field(s):\n  "
                         + "\n  ".join(diffs) + "\nuse the original settings or a new run directory")


def teacher_family(teacher: str | Path) -> str:
    """The model family of a teacher directory, read from its config.json (weights not loaded)."""
    return read_model_metadata(resolve_model_dir(teacher))["model"].get("family", "msdd")


def check_teacher(tok: Tokenizer, teacher: str | Path, family: str) -> None:
    """Refuse teachers this distiller cannot distil, naming the right tool."""
    f = tok.config.family
    if f == "plain":
        raise ValueError(f"{teacher} is a plain autoencoder (model.family=plain): it already decodes in one pass, "
                         f"there is nothing to distil")
    if f != family:
        raise ValueError(f"{teacher} is a model of the {f!r} family; this distiller is for {family!r} teachers "
                         f"(`msdd distill` and `build_distiller` pick the right one)")
    if tok.config.one_step:
        raise ValueError(f"{teacher} is already a distilled one-step student; distil from a stage-1 model")


class DistillerBase(TrainerBase):
    """Stage 2 for teachers of `family`: the student starts as the teacher's weights with the teacher's
    encoder shared and frozen; its decoder (and, when `adversarial`, a discriminator with its own AdamW)
    trains. Subclasses implement `micro_step` and `save_grid`."""

    desc, section = "distill", "distill"
    family = "msdd"  # the teacher family this distiller is for
    adversarial = False  # a discriminator (distill.discriminator) trains beside the student

    def __init__(self, cfg: Config, teacher: str | Path, run_dir: str | Path, device: str | torch.device = "cpu",
                 vgg_weights=None, dino_weights=None, require_resume: bool = False) -> None:
        dc = cfg.distill
        device = setup(device)[1]  # this process's device, before the teacher is loaded onto it
        self.teacher_dir = resolve_model_dir(teacher)  # a folder, a bundled name or a Hub repo id
        self.teacher = Tokenizer.from_pretrained(teacher, device=device).requires_grad_(False).eval()
        check_teacher(self.teacher, teacher, self.family)
        cfg = replace(cfg, model=self.teacher.config)  # the run's model section is the teacher's architecture
        super().__init__(cfg, run_dir, device, cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self.student = Tokenizer(self.student_config(self.teacher.config)).to(self.device)
        self.student.load_state_dict(self.teacher.state_dict())  # the teacher's (EMA) weights
        self.student.encoder.requires_grad_(False)  # shared and frozen
        self.ema = EMA(self.student, dc.ema_decay, dc.ema_warmup)
        if dc.compile:  # the trained decoder only (the EMA's grids and saved model decode on the inference path)
            compile_blocks(self.student.decoder, self.device, setting="distill.compile", keep_graph=True)
        self.disc, self.disc_params = None, []
        if self.adversarial:
            self.disc = build_discriminator(dc.discriminator, dino_weights,
                                            reference_heads=dc.disc_heads == "reference").to(self.device)
            self.disc_params = [p for p in self.disc.parameters() if p.requires_grad]  # the heads, not a frozen ViT
        if not (self.adversarial and dc.discriminator == "dino"):
            unused_file("--dino-weights", dino_weights, f"distill.discriminator={dc.discriminator}"
                        if self.adversarial else f"the {self.family} distillation has no discriminator")
        self.perceptual = None
        if dc.perceptual == "lpips" and dc.lambda_perc > 0:
            from msdd.models.perceptual import LPIPS

            self.perceptual = build_loss_network(
                lambda: LPIPS(vgg_weights), self.device,
                f"distill.perceptual=lpips with lambda_perc={dc.lambda_perc}; set distill.perceptual=none "
                "to distil without it")
        else:
            unused_file("--vgg-weights", vgg_weights, "distill.perceptual=none" if dc.perceptual == "none"
                        else "distill.lambda_perc=0 (no LPIPS loss)")
        lin = self.student.decoder.from_linear
        self.opt = make_optimizer(self.student.decoder.parameters(), dc.lr * dc.lr_batch_factor, cfg.train.betas,
                                  slow=lin.parameters() if lin is not None else (),
                                  slow_scale=cfg.train.linear_lr_scale)
        self.sched = cosine_schedule(self.opt, dc.warmup_steps, dc.max_steps, cfg.train.min_lr_ratio)
        if self.disc is not None:
            self.opt_d = make_optimizer(self.disc_params, dc.disc_lr * dc.lr_batch_factor, cfg.train.betas)
            self.sched_d = cosine_schedule(self.opt_d, dc.warmup_steps, dc.max_steps, cfg.train.min_lr_ratio)
        self.teacher_hash = file_sha256(self.teacher_dir / "model.safetensors")
        self.eval_images = build_eval_images(cfg.data.eval_source, cfg.model.image_size, limit=8)[0]
        self._resume(require_resume, lambda js, path: check_resume(config_from_json(js), self.cfg, path))

    def student_config(self, teacher: ModelConfig) -> ModelConfig:
        """The student's model config: the teacher's, marked one_step (decodes with one step by default)."""
        return replace(teacher, one_step=True)

    # ------------------------------------------------------------------ TrainerBase hooks

    def weights(self) -> dict:
        w = {"student": self.student.state_dict(), "ema": self.ema.module.state_dict()}
        return w if self.disc is None else {**w, "discriminator": self.disc.state_dict()}

    def load_weights(self, w: dict) -> None:
        self.student.load_state_dict(w["student"])
        self.ema.module.load_state_dict(w["ema"])
        if self.disc is not None:
            self.disc.load_state_dict(w["discriminator"])

    def optim_state(self) -> dict:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        if self.disc is not None:
            state.update(optimizer_d=self.opt_d.state_dict(), scheduler_d=self.sched_d.state_dict())
        return {**state, "ema_updates": self.ema.updates, "teacher_sha256": self.teacher_hash}

    def load_optim_state(self, state: dict) -> None:
        if state["teacher_sha256"] != self.teacher_hash:
            raise ValueError(f"cannot resume {self.run_dir}: it was distilled from a different teacher (sha256 "
                             f"{state['teacher_sha256'][:12]}..., now {self.teacher_hash[:12]}...); pass the "
                             "teacher it started from, or start a new run directory")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.disc is not None:
            self.opt_d.load_state_dict(state["optimizer_d"])
            self.sched_d.load_state_dict(state["scheduler_d"])
        self.ema.updates = int(state["ema_updates"])

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.decoder.parameters() if p.requires_grad] + self.disc_params

    def synced_buffers(self) -> list[torch.Tensor]:
        return [] if self.disc is None else list(self.disc.buffers())  # spectral-norm power iteration vectors

    def optimizer_step(self) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.decoder.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.student)
        logs = {"grad_norm": grad_norm.item(), "lr": self.sched.get_last_lr()[0]}
        if self.disc is not None:
            if self.cfg.distill.disc_grad_clip > 0:
                logs["disc_grad_norm"] = torch.nn.utils.clip_grad_norm_(self.disc_params,
                                                                        self.cfg.distill.disc_grad_clip).item()
            self.opt_d.step()
            self.sched_d.step()
        return logs

    def write_grid(self, images: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor) -> Path:
        """real | teacher | student | |student - real| x 4 (the error of `student` as given); `save_grid` clamps
        every column to [-1, 1]."""
        err = (student - images).abs() * 4 - 1
        return save_grid([images, teacher, student, err],
                         self.run_dir / "grids" / f"step_{self.step:08d}.png",
                         labels=["real", "teacher", "student", "error x4"])

    def finalize(self) -> Path:
        """The EMA student to <run>/model: a normal model directory marked one_step."""
        self.ema.module.save_pretrained(self.run_dir / "model", stage=2, steps_trained=self.step,
                                        teacher_sha256=self.teacher_hash, distill=to_dict(self.cfg.distill))
        return self.run_dir / "model"
