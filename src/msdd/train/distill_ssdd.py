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
batch_size, grad_accum, lambda_perc, lambda_pix, perceptual, ema_decay, ema_warmup and the logging cadence (and
train.linear_lr_scale for the linear path, 0: frozen); the teacher's
steps are its own `model.ssdd.steps`. The student is saved as a normal model directory marked
`one_step` (it decodes with one step by default; more steps warn once).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from msdd.flow.path import randn
from msdd.flow.ssdd import sample_ssdd
from msdd.tokenizer import autocast
from msdd.train.distiller import DistillerBase


# the multi-scale distiller's adversarial and guidance settings, which this GAN-free, guidance-free one does not read
NOT_READ = ("distill.lambda_rec", "distill.lambda_adv", "distill.adaptive_adv", "distill.adaptive_of",
            "distill.adv_start_step", "distill.cfg", "distill.teacher_steps", "distill.discriminator",
            "distill.disc_lr", "distill.disc_grad_clip", "distill.student_cfg_drop", "distill.disc_heads")


class SSDDDistiller(DistillerBase):
    """The SSDD teacher's distiller (module docstring): its step and grid; the rest is the base's."""

    checkpoint_metric, family = "l_mse", "ssdd"

    @torch.no_grad()
    def teacher_images(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The teacher's N-step decode of z from `noise`, clamped to [-1, 1] (what its `decode` returns)."""
        ssdd = self.teacher.config.ssdd
        return sample_ssdd(self.teacher.decoder, z, ssdd.steps, ssdd.shift, noise=noise).clamp(-1, 1)

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

    @torch.no_grad()
    def save_grid(self) -> Path:
        """real | teacher (N steps) | student (1 step, EMA) | |student - real| x 4."""
        images = self.eval_images.to(self.device)
        noise = randn(tuple(images.shape), torch.Generator(self.device).manual_seed(0), images)
        with autocast(self.device, self.cfg.train.bf16):
            z = self.teacher.encoder(images).float()
            teacher = self.teacher_images(z, noise)
            student = self.student_images(self.ema.module.decoder, z, noise).clamp(-1, 1)
        return self.write_grid(images, teacher, student)  # the error of the clamped student
