"""GAN-free single-step distillation of an SSDD teacher (SPEC 10).

Per step, for real images x and latents z = E(x) (the teacher's encoder, frozen and shared):

    noise     n ~ N(0, I) at full resolution, one per image
    teacher   the frozen stage-1 model samples its own N-step schedule from n and z (no gradients)
    student   same architecture, initialised from the teacher; ONE Euler step from the same n and z:
              x_s = n - v_student(n, t = 1, z), the sampler's own code with N = 1
    loss      MSE(x_s, teacher image) + distill.lambda_perc * LPIPS(x_s, teacher image)  (LPIPS when
              distill.perceptual = lpips and its weights file is available)
              + distill.lambda_pix * MSE(x_s, x)  (the tie to the real image, as in the msdd distiller)

No discriminator, no guidance. Of the distill section this uses lr, warmup_steps, max_steps,
batch_size, grad_accum, lambda_perc, lambda_pix, perceptual, ema_decay and the logging cadence (and
train.linear_lr_scale for the linear path, 0: frozen); the teacher's
steps are its own `model.ssdd.steps`. The student is saved as a normal model directory marked
`one_step` (it decodes with one step by default; more steps warn once).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from msdd.config import Config, to_dict
from msdd.data import build_eval_images
from msdd.dist import setup
from msdd.eval.grid import save_grid
from msdd.flow.path import randn
from msdd.flow.ssdd import sample_ssdd
from msdd.hub import file_sha256, resolve_model_dir
from msdd.tokenizer import Tokenizer, autocast
from msdd.train.distill import check_distill_resume, check_teacher
from msdd.train.ema import EMA
from msdd.train.loop import TrainerBase
from msdd.train.optim import cosine_schedule, make_optimizer


class SSDDDistiller(TrainerBase):
    desc, section, best_metric = "distill", "distill", "l_mse"

    def __init__(self, cfg: Config, teacher: str | Path, run_dir: str | Path, device: str | torch.device = "cpu",
                 vgg_weights=None, require_resume: bool = False) -> None:
        dc = cfg.distill
        device = setup(device)[1]  # this process's device, before the teacher is loaded onto it
        self.teacher_dir = resolve_model_dir(teacher)  # a folder, a bundled name or a Hub repo id
        self.teacher = Tokenizer.from_pretrained(teacher, device=device).requires_grad_(False).eval()
        check_teacher(self.teacher, teacher, "ssdd")
        cfg = replace(cfg, model=self.teacher.config)  # the run's model section is the teacher's architecture
        super().__init__(cfg, run_dir, device, cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self.student = Tokenizer(replace(self.teacher.config, one_step=True)).to(self.device)
        self.student.load_state_dict(self.teacher.state_dict())  # the teacher's (EMA) weights
        self.student.encoder.requires_grad_(False)  # shared and frozen
        self.ema = EMA(self.student, dc.ema_decay)
        self.perceptual = None
        if dc.perceptual == "lpips" and dc.lambda_perc > 0:
            from msdd.models.perceptual import LPIPS

            try:
                self.perceptual = LPIPS(vgg_weights).to(self.device)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}\n(distill.perceptual=lpips with lambda_perc={dc.lambda_perc}; set "
                                        f"distill.perceptual=none to distil without it)") from None
        lin = self.student.decoder.from_linear
        self.opt = make_optimizer(self.student.decoder.parameters(), dc.lr, cfg.train.betas,
                                  slow=lin.parameters() if lin is not None else (),
                                  slow_scale=cfg.train.linear_lr_scale)
        self.sched = cosine_schedule(self.opt, dc.warmup_steps, dc.max_steps, cfg.train.min_lr_ratio)
        self.teacher_hash = file_sha256(self.teacher_dir / "model.safetensors")
        self.eval_images = build_eval_images(cfg.data.eval_source, cfg.model.image_size, limit=8)[0]
        self._resume(require_resume, lambda js, path: check_distill_resume(js, self.cfg, path))

    # ------------------------------------------------------------------ TrainerBase hooks

    def weights(self) -> dict:
        return {"student": self.student.state_dict(), "ema": self.ema.module.state_dict()}

    def load_weights(self, w: dict) -> None:
        self.student.load_state_dict(w["student"])
        self.ema.module.load_state_dict(w["ema"])

    def optim_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "ema_updates": self.ema.updates, "teacher_sha256": self.teacher_hash}

    def load_optim_state(self, state: dict) -> None:
        if state["teacher_sha256"] != self.teacher_hash:
            raise ValueError(f"cannot resume {self.run_dir}: it was distilled from a different teacher (sha256 "
                             f"{state['teacher_sha256'][:12]}..., now {self.teacher_hash[:12]}...)")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema.updates = int(state["ema_updates"])

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.decoder.parameters() if p.requires_grad]

    @torch.no_grad()
    def teacher_images(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The teacher's N-step decode of z from `noise`, clamped to [-1, 1] (what its `decode` returns)."""
        s = self.teacher.config.ssdd
        return sample_ssdd(self.teacher.decoder, z, s.steps, s.shift, noise=noise).clamp(-1, 1)

    def student_images(self, decoder, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One Euler step from `noise` (differentiable)."""
        return sample_ssdd(decoder, z, 1, self.teacher.config.ssdd.shift, noise=noise)

    def micro_step(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        dc, bf16 = self.cfg.distill, self.cfg.train.bf16
        self.student.decoder.train()
        noise = randn(tuple(images.shape), generator, images)  # (B, 3, R, R), shared by teacher and student
        with torch.no_grad(), autocast(self.device, bf16):
            z = self.teacher.encoder(images).float()
            target = self.teacher_images(z, noise).float()
        with autocast(self.device, bf16):
            x = self.student_images(self.student.decoder, z, noise).float()
            l_mse = F.mse_loss(x, target)
            loss, out = l_mse, {"l_mse": l_mse.item()}
            if self.perceptual is not None:
                l_perc = self.perceptual(x, target).mean()
                loss = loss + dc.lambda_perc * l_perc
                out["l_perc"] = l_perc.item()
            if dc.lambda_pix > 0:  # the tie to the real image, as in the msdd distiller
                l_pix = F.mse_loss(x, images.float())
                loss = loss + dc.lambda_pix * l_pix
                out["l_pix"] = l_pix.item()
        out["l_gen"] = loss.item()
        return loss, out

    def optimizer_step(self) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.decoder.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.student)
        return {"grad_norm": grad_norm.item(), "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def save_grid(self) -> Path:
        """real | teacher (N steps) | student (1 step, EMA) | |student - real| x 4."""
        images = self.eval_images.to(self.device)
        noise = randn(tuple(images.shape), torch.Generator(self.device).manual_seed(0), images)
        with autocast(self.device, self.cfg.train.bf16):
            z = self.teacher.encoder(images).float()
            teacher = self.teacher_images(z, noise)
            student = self.student_images(self.ema.module.decoder, z, noise).clamp(-1, 1)
        err = ((student - images).abs() * 4 - 1).clamp(-1, 1)
        return save_grid([images, teacher, student, err], self.run_dir / "grids" / f"step_{self.step:08d}.png")

    def finalize(self) -> Path:
        """The EMA student to <run>/model: a normal model directory marked one_step."""
        self.ema.module.save_pretrained(self.run_dir / "model", stage=2, steps_trained=self.step,
                                        teacher_sha256=self.teacher_hash, distill=to_dict(self.cfg.distill))
        return self.run_dir / "model"
