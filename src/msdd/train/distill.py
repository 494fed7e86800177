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
              clamped to [0, 1e4] (adaptive weight), 0 before distill.adv_start_step
    discriminator  hinge loss (fp32) on x vs the detached student image, its own AdamW and schedule

The student is saved as a normal msdd model marked `one_step` (decodes with one step per stage).
Teachers of the SSDD family are distilled by `msdd.train.distill_ssdd.SSDDDistiller`;
`build_distiller` picks the class from the teacher's family (plain autoencoders have nothing to distil).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from msdd.config import Config, config_from_json, diff_fields, to_dict
from msdd.data import build_eval_images
from msdd.dist import setup
from msdd.eval.grid import save_grid
from msdd.flow.path import noisy_at, randn, stage_ends
from msdd.flow.sampler import sample
from msdd.flow.schedule import stage_of_tau
from msdd.hub import file_sha256, resolve_model_dir
from msdd.models.discriminator import build_discriminator, hinge_d_loss, hinge_g_loss
from msdd.tokenizer import Tokenizer, autocast
from msdd.train.ema import EMA
from msdd.train.loop import TrainerBase
from msdd.train.optim import cosine_schedule, make_optimizer

MAX_ADAPTIVE_WEIGHT = 1e4


def adaptive_weight(non_adv: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """|d non_adv / dW| / |d adv / dW| at the last layer W, clamped to [0, 1e4] (finite by construction)."""
    g_rec = torch.autograd.grad(non_adv, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_adv.norm() + 1e-4)
    return torch.nan_to_num(w, nan=0.0, posinf=MAX_ADAPTIVE_WEIGHT).clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


def student_pass(decoder, z: torch.Tensor, windows, gamma: float, generator):
    """One Euler step per stage from pure noise, differentiable.
    Returns (final image, outputs of every stage, unit noise each output carries)."""
    return sample(decoder, z, windows, [1] * len(windows), cfg=1.0, gamma=gamma, generator=generator,
                  return_noise=True)


@torch.no_grad()
def teacher_targets(teacher_decoder, x_final: torch.Tensor, z: torch.Tensor, windows, u: float, steps: int,
                    cfg: float, gamma: float, generator) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
    """For the student's final image noised at model time u: (s_u, the teacher's outputs of stages
    s_u..S-1, the unit noise each carries)."""
    s_u = stage_of_tau(windows, u)
    w = windows[s_u]
    r_u = w.r_of_tau(u)
    x_end, x_start = stage_ends(x_final.detach().float(), w)
    noise = randn(tuple(x_end.shape), generator, x_end)
    x_u, _ = noisy_at(x_end, x_start, w, torch.full((x_end.shape[0],), r_u, device=x_end.device), noise)
    _, outs, noises = sample(teacher_decoder, z, windows, [steps] * len(windows), cfg=cfg, gamma=gamma,
                             generator=generator, start=(s_u, r_u, x_u, noise), return_noise=True)
    return s_u, outs, noises


def signal(x: torch.Tensor, noise: torch.Tensor, window) -> torch.Tensor:
    """A stage output without the noise its path carries: (1 - e) content."""
    return x.float() - window.t_end * noise.float()


def teacher_family(teacher: str | Path) -> str:
    """The model family of a teacher directory, read from its config.json (weights not loaded)."""
    from msdd.hub import read_model_metadata, resolve_model_dir

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


def check_distill_resume(stored_json: str, cfg: Config, path: Path) -> None:
    """Refuse to resume a distillation run whose stored config differs in a field that matters."""
    # `train.*` fields no distiller reads (they configure stage 1). The rest of the section is checked:
    # seed, bf16, betas, grad_clip, linear_lr_scale and min_lr_ratio are read by Distiller and SSDDDistiller,
    # and a new field is checked until it is added here. A hand list: tests/test_faults.py finds every
    # train field read in distill.py, distill_ssdd.py and loop.py and fails if one of them is listed here.
    stage1_only = ("batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "max_steps", "ema_decay",
                   "init_from", "pca_crops", "log_every", "ckpt_every", "grid_every", "keep_checkpoints")
    free = ("distill.log_every", "distill.ckpt_every", "distill.grid_every", "data.num_workers", "name",
            *(f"train.{k}:" for k in stage1_only))
    diffs = [d for d in diff_fields(config_from_json(stored_json), cfg) if not d.startswith(free)]
    if diffs:
        raise ValueError(f"cannot resume {path}: its config differs in {len(diffs)} field(s):\n  "
                         + "\n  ".join(diffs) + "\nuse the original settings or a new run directory")


def build_distiller(cfg: Config, teacher: str | Path, run_dir: str | Path, device: str | torch.device = "cpu",
                    vgg_weights=None, dino_weights=None, require_resume: bool = False) -> TrainerBase:
    """The distiller for the teacher's family: `Distiller` (msdd) or `SSDDDistiller` (ssdd)."""
    if teacher_family(teacher) == "ssdd":
        from msdd.train.distill_ssdd import SSDDDistiller

        return SSDDDistiller(cfg, teacher, run_dir, device=device, vgg_weights=vgg_weights,
                             require_resume=require_resume)
    return Distiller(cfg, teacher, run_dir, device=device, vgg_weights=vgg_weights, dino_weights=dino_weights,
                     require_resume=require_resume)


class Distiller(TrainerBase):
    desc, section, best_metric = "distill", "distill", "l_rec"

    def __init__(self, cfg: Config, teacher: str | Path, run_dir: str | Path, device: str | torch.device = "cpu",
                 vgg_weights=None, dino_weights=None, require_resume: bool = False) -> None:
        dc = cfg.distill
        device = setup(device)[1]  # this process's device, before the teacher is loaded onto it
        self.teacher_dir = resolve_model_dir(teacher)  # a folder, a bundled name or a Hub repo id
        self.teacher = Tokenizer.from_pretrained(teacher, device=device).requires_grad_(False).eval()
        check_teacher(self.teacher, teacher, "msdd")
        cfg = replace(cfg, model=self.teacher.config)  # the run's model section is the teacher's architecture
        super().__init__(cfg, run_dir, device, cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        student_cfg = replace(self.teacher.config, one_step=True, sampling=replace(self.teacher.config.sampling, cfg=1.0))
        self.student = Tokenizer(student_cfg).to(self.device)
        self.student.load_state_dict(self.teacher.state_dict())  # the teacher's (EMA) weights
        self.student.encoder.requires_grad_(False)  # shared and frozen
        self.ema = EMA(self.student, dc.ema_decay)
        self.disc = build_discriminator(dc.discriminator, dino_weights).to(self.device)
        self.disc_params = [p for p in self.disc.parameters() if p.requires_grad]  # the heads, not a frozen ViT
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
        self.opt_d = make_optimizer(self.disc_params, dc.disc_lr, cfg.train.betas)
        self.sched_d = cosine_schedule(self.opt_d, dc.warmup_steps, dc.max_steps, cfg.train.min_lr_ratio)
        self.teacher_hash = file_sha256(self.teacher_dir / "model.safetensors")
        self.eval_images = build_eval_images(cfg.data.eval_source, cfg.model.image_size, limit=8)[0]
        self._resume(require_resume, self._check_resume)

    def _check_resume(self, stored_json: str, path: Path) -> None:
        check_distill_resume(stored_json, self.cfg, path)

    # ------------------------------------------------------------------ TrainerBase hooks

    def weights(self) -> dict:
        return {"student": self.student.state_dict(), "ema": self.ema.module.state_dict(),
                "discriminator": self.disc.state_dict()}

    def load_weights(self, w: dict) -> None:
        self.student.load_state_dict(w["student"])
        self.ema.module.load_state_dict(w["ema"])
        self.disc.load_state_dict(w["discriminator"])

    def optim_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "optimizer_d": self.opt_d.state_dict(), "scheduler_d": self.sched_d.state_dict(),
                "ema_updates": self.ema.updates, "teacher_sha256": self.teacher_hash}

    def load_optim_state(self, state: dict) -> None:
        if state["teacher_sha256"] != self.teacher_hash:
            raise ValueError(f"cannot resume {self.run_dir}: it was distilled from a different teacher (sha256 "
                             f"{state['teacher_sha256'][:12]}..., now {self.teacher_hash[:12]}...)")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.opt_d.load_state_dict(state["optimizer_d"])
        self.sched_d.load_state_dict(state["scheduler_d"])
        self.ema.updates = int(state["ema_updates"])

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.decoder.parameters() if p.requires_grad] + self.disc_params

    def micro_step(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Generator loss + discriminator loss: the first reaches only the student (the discriminator is
        frozen while it is built), the second only the discriminator (the student image is detached)."""
        dc, windows, gamma = self.cfg.distill, self.student.windows, self.student.config.flow.gamma
        bf16 = self.cfg.train.bf16
        self.student.decoder.train()
        with torch.no_grad(), autocast(self.device, bf16):
            z = self.teacher.encoder(images).float()
        u = torch.rand((), generator=generator, device=generator.device).item()
        self.disc.requires_grad_(False)
        with autocast(self.device, bf16):
            x_student, stages_s, noise_s = student_pass(self.student.decoder, z, windows, gamma, generator)
            s_u, stages_t, noise_t = teacher_targets(self.teacher.decoder, x_student, z, windows, u,
                                                     dc.teacher_steps, dc.cfg, gamma, generator)
            gaps = [F.mse_loss(signal(stages_s[s], noise_s[s], windows[s]), signal(t, n, windows[s]))
                    for s, t, n in zip(range(s_u, len(windows)), stages_t, noise_t)]
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
            non_adv = dc.lambda_rec * non_adv
            use_adv = dc.lambda_adv > 0 and self.step >= dc.adv_start_step
            fake_logits = self.disc(x_student) if use_adv else None
        l_adv = hinge_g_loss(fake_logits) if use_adv else torch.zeros((), device=self.device)
        lam = torch.zeros((), device=self.device)
        if use_adv:
            lam = (adaptive_weight(non_adv, l_adv, self.student.decoder.final.linear.weight) * dc.lambda_adv
                   if dc.adaptive_adv else torch.tensor(dc.lambda_adv, device=self.device))
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

    def synced_buffers(self) -> list[torch.Tensor]:
        return list(self.disc.buffers())  # spectral-norm power iteration vectors

    def optimizer_step(self) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.decoder.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.student)
        self.opt_d.step()
        self.sched_d.step()
        return {"grad_norm": grad_norm.item(), "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def save_grid(self) -> Path:
        """real | teacher (its default steps) | student (1 step per stage) | |student - real| x 4."""
        images, g = self.eval_images.to(self.device), torch.Generator(self.device).manual_seed(0)
        with autocast(self.device, self.cfg.train.bf16):
            z = self.teacher.encoder(images).float()
            t = self.teacher.config
            teacher = sample(self.teacher.decoder, z, self.teacher.windows, t.sampling.steps, cfg=t.sampling.cfg,
                             gamma=t.flow.gamma, generator=g)
            student = sample(self.ema.module.decoder, z, self.teacher.windows, [1] * t.flow.num_stages,
                             gamma=t.flow.gamma, generator=g)
        err = ((student - images).abs() * 4 - 1).clamp(-1, 1)
        return save_grid([images, teacher.clamp(-1, 1), student.clamp(-1, 1), err],
                         self.run_dir / "grids" / f"step_{self.step:08d}.png")

    def finalize(self) -> Path:
        """The EMA student to <run>/model: a normal msdd model marked one_step."""
        self.ema.module.save_pretrained(self.run_dir / "model", stage=2, steps_trained=self.step,
                                        teacher_sha256=self.teacher_hash,
                                        distill=to_dict(self.cfg.distill))
        return self.run_dir / "model"


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
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
