"""Stage 2: distil the multi-step teacher into a one-step-per-stage student (SPEC 7).

Per step, for real images x and latents z = E(x) (the frozen, shared encoder):

    student   pure noise -> ONE Euler step per stage (renoising in between, the sampler's own code),
              gradients through the whole chain; outputs of every stage kept
    target    u ~ U(0, 1) -> stage s_u whose tau window holds u; the student's final image (detached)
              brought down to stage s_u and noised onto that stage's path at u; the frozen teacher
              runs from there to the end (distill.teacher_steps per stage, guidance distill.cfg)
    losses    L_rec  = sum over s >= s_u of MSE(signal of student_s, signal of teacher_s), where the
                       signal of a stage output is the output minus e_s N_s, the unit noise its chain
                       carries (traced by the sampler). The two chains draw independent noise; comparing
                       raw intermediate outputs would add a floor of 2 e_s^2 per stage (1.75 of the loss
                       for s_u = 0 with four stages) whose gradient strips the noise from the student's
                       intermediate states; the student then decodes grey images (measured).
              L_perc = LPIPS(student_final, x)                        (when enabled)
              L_pix  = MSE(student_final, x)                          (distill.lambda_pix > 0: the offline
                       tie to the real image when LPIPS has no VGG16 file)
              L_adv  = hinge generator loss of the discriminator on student_final
              total  = lambda_adv' L_adv + lambda_rec (L_rec / (1 + u) + lambda_perc L_perc + lambda_pix L_pix)
              lambda_adv' = lambda_adv * |grad L_nonadv| / |grad L_adv| at the decoder's last layer,
              clamped to [0, 1e4] (adaptive weight), 0 before distill.adv_start_step; with
              distill.adaptive_of=reference the numerator is that of L_rec + lambda_perc L_perc
              (+ lambda_pix L_pix), without lambda_rec and 1 / (1 + u), as the reference code.
              By default (`adaptive_loss`) the step's gradients come from two full backward passes, of
              L_nonadv and of L_adv, which also give lambda_adv': shorter steps on tiny-64 than two passes
              to the last layer and a third through the total (still the way for adaptive_of=reference;
              benchmarks/README.md, "Stage 2")
    discriminator  hinge loss (fp32) on x vs the detached student image, its own AdamW and schedule

The student is saved as a normal msdd model marked `one_step` (decodes with one step per stage).
Teacher, student, EMA, optimisers, resume and the saved model are `msdd.train.distiller.DistillerBase`'s.
Teachers of the SSDD family are distilled by `msdd.train.distill_ssdd.SSDDDistiller`;
`build_distiller` picks the class from the teacher's family (plain autoencoders have nothing to distil).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from msdd.config import Config, ModelConfig
from msdd.flow.path import drop_context, noisy_at, randn, stage_ends
from msdd.flow.sampler import SampleResult, sample_multiscale
from msdd.flow.schedule import stage_of_tau
from msdd.models.discriminator import hinge_d_loss, hinge_g_loss
from msdd.tokenizer import autocast, synchronize
from msdd.train.distill_ssdd import SSDDDistiller
from msdd.train.distiller import DistillerBase, teacher_family
from msdd.train.loop import TrainerBase

MAX_ADAPTIVE_WEIGHT = 1e4


def adaptive_weight(non_adv: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """|d non_adv / dW| / |d adv / dW| at the last layer W, clamped to [0, 1e4] (finite by construction)."""
    g_rec = torch.autograd.grad(non_adv, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    return _norm_ratio(g_rec, g_adv)


def _norm_ratio(g_rec: torch.Tensor, g_adv: torch.Tensor) -> torch.Tensor:
    w = g_rec.norm() / (g_adv.norm() + 1e-4)
    return torch.nan_to_num(w, nan=0.0, posinf=MAX_ADAPTIVE_WEIGHT).clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


def adaptive_loss(non_adv: torch.Tensor, adv: torch.Tensor, params: list[torch.nn.Parameter],
                  last_layer: torch.nn.Parameter, lambda_adv: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam, non_adv + lam adv) with lam = lambda_adv * `adaptive_weight(non_adv, adv, last_layer)`, whose backward
    gives `params` the gradients of that sum in two backward passes instead of three: the gradients of non_adv
    and of adv with respect to every parameter (the last layer's among them, which give lam), then combined. (Two
    passes to the last layer and a third through the sum go through the network almost three times: the last
    layer is used at every stage. A distillation step on tiny-64: benchmarks/README.md, "Stage 2".)"""
    g_non = torch.autograd.grad(non_adv, params, retain_graph=True, allow_unused=True)
    g_adv = torch.autograd.grad(adv, params, allow_unused=True)
    last = next(i for i, p in enumerate(params) if p is last_layer)
    lam = _norm_ratio(g_non[last], g_adv[last]) * lambda_adv
    # in place: one more set of gradients than a single backward pass keeps, not two
    grads = [a if b is None else b.mul_(lam) if a is None else a.add_(b.mul_(lam)) for a, b in zip(g_non, g_adv)]
    value = non_adv.detach() + lam * adv.detach()
    return lam, _WithGradients.apply(value, grads, *params)


class _WithGradients(torch.autograd.Function):
    """A loss's value whose gradients are already computed: its backward hands them (times the incoming gradient)
    to the parameters without going through the network again."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: list[torch.Tensor | None], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return None, None, *(None if g is None else g * grad_out for g in ctx.grads)


def student_pass(decoder, z: torch.Tensor, windows, generator) -> SampleResult:
    """One Euler step per stage from pure noise, differentiable: (final image, outputs of every stage,
    unit noise each output carries)."""
    return sample_multiscale(decoder, z, windows, [1] * len(windows), guidance=1.0, generator=generator)


@torch.no_grad()
def teacher_targets(teacher_decoder, x_final: torch.Tensor, z: torch.Tensor, windows, u: float, steps: int,
                    guidance: float, generator) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
    """For the student's final image noised at model time u: (s_u, the teacher's outputs of stages
    s_u..S-1, the unit noise each carries)."""
    s_u = stage_of_tau(windows, u)
    w = windows[s_u]
    r_u = w.r_of_tau(u)
    x_end, x_start = stage_ends(x_final.detach().float(), w)
    noise = randn(tuple(x_end.shape), generator, x_end)
    x_u, _ = noisy_at(x_end, x_start, w, torch.full((x_end.shape[0],), r_u, device=x_end.device), noise)
    _, outs, noises = sample_multiscale(teacher_decoder, z, windows, [steps] * len(windows), guidance=guidance,
                                        generator=generator, start=(s_u, r_u, x_u, noise))
    return s_u, outs, noises


def without_noise(x: torch.Tensor, noise: torch.Tensor, window) -> torch.Tensor:
    """A stage output x less the unit noise N its chain carries: x - e N, its (1 - e) content part."""
    return x.float() - window.t_end * noise.float()


def build_distiller(cfg: Config, teacher: str | Path, run_dir: str | Path, device: str | torch.device = "cpu",
                    vgg_weights=None, dino_weights=None, require_resume: bool = False) -> TrainerBase:
    """The distiller for the teacher's family: `Distiller` (msdd) or `SSDDDistiller` (ssdd)."""
    if teacher_family(teacher) == "ssdd":
        return SSDDDistiller(cfg, teacher, run_dir, device=device, vgg_weights=vgg_weights,
                             require_resume=require_resume)
    return Distiller(cfg, teacher, run_dir, device=device, vgg_weights=vgg_weights, dino_weights=dino_weights,
                     require_resume=require_resume)


class Distiller(DistillerBase):
    """The multi-scale teacher's distiller (module docstring): its step and grid; the rest is the base's."""

    checkpoint_metric, family, adversarial = "l_rec", "msdd", True

    def student_config(self, teacher: ModelConfig) -> ModelConfig:
        return replace(super().student_config(teacher), sampling=replace(teacher.sampling, cfg=1.0))

    def micro_step(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Generator loss + discriminator loss: the first reaches only the student (the discriminator is
        frozen while it is built), the second only the discriminator (the student image is detached)."""
        dc, windows = self.cfg.distill, self.student.windows
        bf16 = self.cfg.train.bf16
        self.student.decoder.train()
        with torch.no_grad(), autocast(self.device, bf16):
            z = self.teacher.encoder(images).float()
        if dc.student_cfg_drop > 0:  # null context for a share of the passes, the teacher's targets too
            z = drop_context(z, self.student.decoder.null_context.detach(), dc.student_cfg_drop, generator)
        u = torch.rand((), generator=generator, device=generator.device).item()
        self.disc.requires_grad_(False)
        with autocast(self.device, bf16):
            x_student, stages_s, noise_s = student_pass(self.student.decoder, z, windows, generator)
            s_u, stages_t, noise_t = teacher_targets(self.teacher.decoder, x_student, z, windows, u,
                                                     dc.teacher_steps, dc.cfg, generator)
            gaps = [F.mse_loss(without_noise(stages_s[stage], noise_s[stage], windows[stage]),
                               without_noise(t, n, windows[stage]))
                    for stage, t, n in zip(range(s_u, len(windows)), stages_t, noise_t)]
            l_rec = torch.stack(gaps).sum()
            non_adv = l_rec / (1 + u)
            l_pix = None
            if dc.lambda_pix > 0:
                l_pix = F.mse_loss(x_student.float(), images.float())
                non_adv = non_adv + dc.lambda_pix * l_pix
            l_perc = None
            if self.perceptual is not None:
                l_perc = self.perceptual(x_student, images).mean()
                non_adv = non_adv + dc.lambda_perc * l_perc
            # the adaptive weight balances the adversarial gradient against this term ("total"), or against
            # L_rec + lambda_perc L_perc (+ lambda_pix L_pix) unweighted, as the reference code ("reference")
            balance = None
            if dc.adaptive_of == "reference":
                balance = l_rec + sum(lam_ * term for lam_, term in ((dc.lambda_pix, l_pix), (dc.lambda_perc, l_perc))
                                      if term is not None)
            non_adv = dc.lambda_rec * non_adv
            use_adv = dc.lambda_adv > 0 and self.step >= dc.adv_start_step
            fake_logits = self.disc(x_student) if use_adv else None
        l_adv = hinge_g_loss(fake_logits) if use_adv else torch.zeros((), device=self.device)
        lam, last_layer = torch.zeros((), device=self.device), self.student.decoder.final.linear.weight
        if use_adv and dc.adaptive_adv and balance is None:  # lam from the gradients the step needs anyway
            params = [p for p in self.student.decoder.parameters() if p.requires_grad]
            lam, loss = adaptive_loss(non_adv, l_adv, params, last_layer, dc.lambda_adv)
        else:
            if use_adv:
                lam = (adaptive_weight(balance, l_adv, last_layer) * dc.lambda_adv if dc.adaptive_adv
                       else torch.tensor(dc.lambda_adv, device=self.device))
            loss = non_adv + lam * l_adv
        for p in self.disc_params:  # the heads train; a frozen DINO ViT stays frozen
            p.requires_grad_(True)
        with autocast(self.device, bf16):
            real_logits = self.disc(images)
            fake_logits_d = self.disc(x_student.detach())
        d_loss = hinge_d_loss(real_logits, fake_logits_d)  # fp32
        out = {"l_gen": loss.item(), "l_rec": l_rec.item(), "l_adv": l_adv.item(), "lambda_adv": float(lam),
               "d_loss": d_loss.item(), "d_real": real_logits.float().mean().item(),
               "d_fake": fake_logits_d.float().mean().item(), "u": u,
               **{f"gap_stage{s_u + i}": g.item() for i, g in enumerate(gaps)}}
        if l_perc is not None:
            out["l_perc"] = l_perc.item()
        if l_pix is not None:
            out["l_pix"] = l_pix.item()
        return loss + d_loss, out

    @torch.no_grad()
    def save_grid(self) -> Path:
        """real | teacher (its default steps) | student (1 step per stage) | |student - real| x 4."""
        images, g = self.eval_images.to(self.device), torch.Generator(self.device).manual_seed(0)
        with autocast(self.device, self.cfg.train.bf16):
            z = self.teacher.encoder(images).float()
            sampling, windows = self.teacher.config.sampling, self.teacher.windows
            teacher = sample_multiscale(self.teacher.decoder, z, windows, sampling.steps, guidance=sampling.cfg,
                                        generator=g).image
            student = sample_multiscale(self.ema.module.decoder, z, windows, [1] * len(windows), generator=g).image
        return self.write_grid(images, teacher, student)


def measure_distill_step_time(cfg: Config, teacher: str | Path, steps: int = 3, warmup: int = 1,
                              device: str | torch.device = "cpu") -> float:
    """Median seconds of a distillation step for `cfg` on random images (a throwaway run)."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        d = build_distiller(cfg, teacher, tmp, device=device)
        r = d.cfg.model.image_size
        images = torch.rand(cfg.distill.batch_size, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            d.train_step(images.to(d.device))
            synchronize(d.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
