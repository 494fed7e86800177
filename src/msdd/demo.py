"""`msdd demo`: the whole path on the embedded photographs, on a CPU, in a bounded time.

1. stage 1: train the tiny preset on random crops of the embedded training photos;
2. stage 2: distil it into a one-step-per-stage student;
3. reconstruct the held-out photos (never seen in training) with teacher and student, timing both;
4. compare with a bicubic down/up baseline that keeps as many floats as the latent;
5. write <out>/report/: grid.png, metrics.json, summary.md (also printed).

`minutes` is the training budget of both stages together (70% stage 1, 30% stage 2).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from msdd.config import Config, config_from_json, load_config
from msdd.data import embedded_eval_set
from msdd.eval.grid import save_grid
from msdd.eval.metrics import bicubic_baseline, bicubic_side, psnr_per_image, ssim_per_image
from msdd.eval.reconstruct import reconstruct_images
from msdd.tokenizer import Tokenizer
from msdd.train.distill import Distiller, measure_distill_step_time
from msdd.train.stage1 import Stage1Trainer, measure_step_time


def budgeted_config(cfg: Config, stage1_minutes: float, device: str) -> tuple[Config, float]:
    """Fit train.max_steps (and warm-up) to a wall-time budget from a measured step time, so the LR
    schedule completes within the budget."""
    step_s = measure_step_time(cfg, device=device)
    steps = max(10, int(stage1_minutes * 60 / step_s * 0.95))
    train = replace(cfg.train, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10),
                    ckpt_every=max(50, steps // 10), grid_every=max(50, steps // 5))
    return replace(cfg, train=train), step_s


def budgeted_distill(cfg: Config, teacher: Path, minutes: float, device: str) -> tuple[Config, float]:
    step_s = measure_distill_step_time(cfg, teacher, device=device)
    steps = max(10, int(minutes * 60 / step_s * 0.95))
    distill = replace(cfg.distill, max_steps=steps, warmup_steps=min(cfg.distill.warmup_steps, steps // 10),
                      ckpt_every=max(50, steps // 10), grid_every=max(50, steps // 5))
    return replace(cfg, distill=distill), step_s


def quality(recon: torch.Tensor, images: torch.Tensor, names: list[str]) -> dict:
    psnr, ssim = psnr_per_image(recon, images), ssim_per_image(recon, images)
    whole = torch.tensor(["_" not in n for n in names])  # the whole held-out photos (not their tiles)
    return {
        "psnr": round(psnr.mean().item(), 3), "ssim": round(ssim.mean().item(), 4),
        "psnr_whole_photos": round(psnr[whole].mean().item(), 3), "ssim_whole_photos": round(ssim[whole].mean().item(), 4),
        "per_image": {n: [round(p, 3), round(s, 4)] for n, p, s in zip(names, psnr.tolist(), ssim.tolist())},
    }


def run_demo(out_dir: str | Path = "msdd-demo", minutes: float = 10.0, preset: str = "tiny-64",
             overrides: tuple[str, ...] = (), device: str = "cpu", progress: bool = True) -> dict:
    out = Path(out_dir)
    run1, run2, report_dir = out / "stage1", out / "stage2", out / "report"
    t_start = time.monotonic()
    # A run directory that already has a config continues with its own (interrupted demo).
    if (run1 / "config.json").exists():
        cfg = config_from_json((run1 / "config.json").read_text())
        print(f"continuing stage 1 in {run1}")
    else:
        cfg, step_s = budgeted_config(load_config(preset, list(overrides)), 0.7 * minutes, device)
        print(f"stage 1: {step_s:.2f} s per step at batch {cfg.train.batch_size} -> {cfg.train.max_steps} steps")
    summary1 = Stage1Trainer(cfg, run1, device=device).fit(progress=progress)
    if (run2 / "config.json").exists():
        cfg2 = config_from_json((run2 / "config.json").read_text())
        print(f"continuing stage 2 in {run2}")
    else:
        cfg2, step_s = budgeted_distill(cfg, run1 / "model", 0.3 * minutes, device)
        print(f"stage 2: {step_s:.2f} s per step at batch {cfg2.distill.batch_size} -> {cfg2.distill.max_steps} steps")
    summary2 = Distiller(cfg2, run1 / "model", run2, device=device).fit(progress=progress)

    teacher = Tokenizer.from_pretrained(run1 / "model", device=device)
    student = Tokenizer.from_pretrained(run2 / "model", device=device)
    images, names = embedded_eval_set(cfg.model.image_size)
    floats = cfg.model.latent_tokens * cfg.model.latent_dim
    bicubic = bicubic_baseline(images, floats)
    decoded = {}
    for name, tok in (("teacher", teacher), ("student", student)):
        recon, decode_s = reconstruct_images(tok, images, seed=0)
        passes = sum(tok.default_steps()) * (1 if tok.config.sampling.cfg in (0.0, 1.0) else 2)
        decoded[name] = recon
        decoded[name + "_row"] = {**quality(recon, images, names), "steps_per_stage": list(tok.default_steps()),
                                  "cfg": tok.config.sampling.cfg, "decoder_passes": passes,
                                  "decode_seconds_per_image": round(decode_s, 5)}
    t, s = decoded["teacher_row"], decoded["student_row"]
    results = {
        "preset": cfg.name,
        "device": device,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "stage1": {"steps": summary1["steps"], "seconds": round(summary1["seconds"], 1),
                   "batch_size": cfg.train.batch_size, "final_loss": summary1["last"].get("loss")},
        "stage2": {"steps": summary2["steps"], "seconds": round(summary2["seconds"], 1),
                   "batch_size": cfg2.distill.batch_size, "discriminator": cfg2.distill.discriminator,
                   "perceptual": cfg2.distill.perceptual if cfg2.distill.lambda_perc > 0 else "none"},
        "eval_set": {"images": len(names), "source": "embedded held-out photos (chelsea, rocket, flower): whole "
                     "photo centre crops + 2x2 and 3x3 tiles, never seen in training",
                     "resolution": cfg.model.image_size},
        "latent": {"tokens": cfg.model.latent_tokens, "channels": cfg.model.latent_dim, "floats": floats},
        "teacher": t,
        "student": s,
        "student_vs_teacher": {"psnr_diff_db": round(s["psnr"] - t["psnr"], 3),
                               "pass_ratio": round(t["decoder_passes"] / s["decoder_passes"], 2),
                               "speedup": round(t["decode_seconds_per_image"] / s["decode_seconds_per_image"], 2)},
        "bicubic": {**quality(bicubic, images, names), "side": bicubic_side(floats),
                    "floats": 3 * bicubic_side(floats) ** 2},
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(names)), key=lambda i: ("_" in names[i], i))[:12]  # whole photos first
    save_grid([images[order], bicubic[order], decoded["teacher"][order], decoded["student"][order]],
              report_dir / "grid.png")
    (report_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = render_summary(results, time.monotonic() - t_start)
    (report_dir / "summary.md").write_text(summary)
    print(summary)
    return results


def render_summary(r: dict, total_s: float) -> str:
    rows = []
    for key, label in (("teacher", "msdd teacher (stage 1)"), ("student", "msdd student (stage 2)")):
        m = r[key]
        rows.append(f"| {label}, steps {m['steps_per_stage']}, cfg {m['cfg']} | {r['latent']['floats']} | "
                    f"{m['psnr']:.2f} | {m['ssim']:.3f} | {m['psnr_whole_photos']:.2f} | {m['decoder_passes']} | "
                    f"{m['decode_seconds_per_image']:.4f} |")
    b, sv = r["bicubic"], r["student_vs_teacher"]
    gain = r["teacher"]["psnr"] - b["psnr"]
    lines = [
        f"# msdd demo ({r['preset']}, {r['device']}, {r['machine']})",
        "",
        f"Stage 1: {r['stage1']['steps']} steps (batch {r['stage1']['batch_size']}) in {r['stage1']['seconds']:.0f} s. "
        f"Stage 2: {r['stage2']['steps']} steps (batch {r['stage2']['batch_size']}, {r['stage2']['discriminator']} "
        f"discriminator, perceptual: {r['stage2']['perceptual']}) in {r['stage2']['seconds']:.0f} s. "
        f"Whole demo: {total_s / 60:.1f} min.",
        f"Evaluated on {r['eval_set']['images']} held-out images at {r['eval_set']['resolution']} px "
        f"({r['eval_set']['source']}).",
        "",
        "| decoder | floats | PSNR (dB) | SSIM | PSNR whole photos | decoder passes | decode s/img |",
        "|---|---|---|---|---|---|---|",
        *rows,
        f"| bicubic {b['side']}x{b['side']} -> up | {b['floats']} | {b['psnr']:.2f} | {b['ssim']:.3f} | "
        f"{b['psnr_whole_photos']:.2f} | - | - |",
        "",
        f"Student vs teacher: {sv['psnr_diff_db']:+.2f} dB PSNR with {sv['pass_ratio']:g}x fewer decoder passes, "
        f"{sv['speedup']:g}x faster decode (measured in this run).",
        f"The teacher is {abs(gain):.2f} dB {'above' if gain >= 0 else 'below'} the bicubic baseline at the same "
        "number of floats.",
        "Grid (real | bicubic | teacher | student): report/grid.png",
        "",
    ]
    return "\n".join(lines)
