"""`msdd demo`: the whole path on the embedded photographs, on a CPU, reproducibly.

1. stage 1: train the tiny preset on random crops of the embedded training photos for a fixed number
   of steps (`msdd.train.budget.DEMO_STAGE1_STEPS`);
2. stage 2: distil it into a one-step-per-stage student (`DEMO_DISTILL_STEPS`);
3. reconstruct the held-out photos (never seen in training) with teacher and student, timing both;
4. compare with the baselines that keep as many floats as the latent: bicubic down/up and PCA fitted
   on training crops (msdd.eval.baselines), and with the shipped pretrained model of the same preset;
5. write <out>/report/: grid.png, metrics.json, summary.md (also printed).

Fixed step counts make two machines train the same model; `minutes` instead sizes both stages from
a measured step time (70% stage 1, 30% stage 2), so that model depends on the machine's speed.
The README gives the measured run time and results.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from msdd.config import Config, config_from_json, load_config
from msdd.data import embedded_eval_set
from msdd.eval.grid import save_grid
from msdd.eval.baselines import default_pca_crops, pca_baseline, pca_for_source
from msdd.eval.metrics import bicubic_baseline, bicubic_side, psnr_per_image, ssim_per_image
from msdd.eval.reconstruct import reconstruct_images
from msdd.hub import BUNDLED
from msdd.tokenizer import Tokenizer
from msdd.train.budget import budgeted_config, budgeted_distill, fixed_steps
from msdd.train.distill import Distiller
from msdd.train.stage1 import Stage1Trainer


def _stop_if_interrupted(summary: dict, out: Path) -> dict:
    """A stage stopped by SIGTERM / SIGINT ends the demo (exit code 128 + signal) instead of going on
    without its model; the same command continues it."""
    import signal

    stop = summary["interrupted"]
    if stop:
        print(f"demo interrupted ({stop}); run the same command again (`msdd demo --out {out}`) to continue")
        raise SystemExit(128 + signal.Signals[stop] if stop in signal.Signals.__members__ else 1)
    return summary


def quality(recon: torch.Tensor, images: torch.Tensor, names: list[str]) -> dict:
    psnr, ssim = psnr_per_image(recon, images), ssim_per_image(recon, images)
    whole = torch.tensor(["_" not in n for n in names])  # the whole held-out photos (not their tiles)
    return {
        "psnr": round(psnr.mean().item(), 3), "ssim": round(ssim.mean().item(), 4),
        "psnr_whole_photos": round(psnr[whole].mean().item(), 3),
        "ssim_whole_photos": round(ssim[whole].mean().item(), 4),
        "per_image": {n: [round(p, 3), round(s, 4)] for n, p, s in zip(names, psnr.tolist(), ssim.tolist())},
    }


SIZED = ("max_steps", "ckpt_every", "grid_every")  # of train and distill: the demo sets them (the warm-up: capped)


def _demo_config(preset: str, overrides: Sequence[str]) -> Config:
    """The config the demo trains: an msdd-family preset; overrides of the step counts it sizes are named as unused."""
    sized = [o for o in overrides if o.split("=", 1)[0].strip() in {f"{s}.{k}" for s in ("train", "distill")
                                                                     for k in SIZED}]
    if sized:
        warnings.warn(f"--set {', '.join(sized)}: not used, the demo sizes its own steps, checkpoints and grids "
                      "(fixed, or from --minutes); run `msdd train` and `msdd distill` for a schedule of your own",
                      stacklevel=2)
    cfg = load_config(preset, list(overrides))
    if cfg.model.family != "msdd":
        raise ValueError(f"--preset {preset} is of the {cfg.model.family!r} family; the demo trains and distils the "
                         "multi-scale (msdd) family: pass an msdd preset such as tiny-64, or use `msdd train` and "
                         "`msdd distill`")
    return cfg


def run_demo(out_dir: str | Path = "msdd-demo", minutes: float | None = None, preset: str = "tiny-64",
             overrides: tuple[str, ...] = (), device: str = "cpu", progress: bool = True) -> dict:
    out = Path(out_dir)
    run1, run2, report_dir = out / "stage1", out / "stage2", out / "report"
    t_start = time.monotonic()
    asked = _demo_config(preset, overrides)  # checked before anything trains
    # A run directory that already has a config continues with its own (interrupted demo), if it is the one asked for.
    if (run1 / "config.json").exists():
        cfg = config_from_json((run1 / "config.json").read_text())
        if (cfg.name, cfg.model, cfg.data) != (asked.name, asked.model, asked.data):
            raise ValueError(f"{out} holds a demo of {cfg.name} with other model or data settings than --preset "
                             f"{preset} {' '.join('--set ' + o for o in overrides)}: pass another --out, or the "
                             "settings it was started with to continue it")
        print(f"continuing stage 1 in {run1}")
    elif minutes is None:
        cfg = fixed_steps(asked)
        print(f"stage 1: {cfg.train.max_steps} steps at batch {cfg.train.batch_size}")
    else:
        cfg, step_s = budgeted_config(asked, 0.7 * minutes, device)
        print(f"stage 1: {step_s:.2f} s per step at batch {cfg.train.batch_size} -> {cfg.train.max_steps} steps")
    summary1 = _stop_if_interrupted(Stage1Trainer(cfg, run1, device=device).fit(progress=progress), out)
    if (run2 / "config.json").exists():
        cfg2 = config_from_json((run2 / "config.json").read_text())
        print(f"continuing stage 2 in {run2}")
    elif minutes is None:
        cfg2 = cfg
        print(f"stage 2: {cfg2.distill.max_steps} steps at batch {cfg2.distill.batch_size}")
    else:
        cfg2, step_s = budgeted_distill(cfg, run1 / "model", 0.3 * minutes, device)
        print(f"stage 2: {step_s:.2f} s per step at batch {cfg2.distill.batch_size} -> {cfg2.distill.max_steps} steps")
    summary2 = _stop_if_interrupted(Distiller(cfg2, run1 / "model", run2, device=device).fit(progress=progress), out)

    teacher = Tokenizer.from_pretrained(run1 / "model", device=device)
    student = Tokenizer.from_pretrained(run2 / "model", device=device)
    images, names = embedded_eval_set(cfg.model.image_size)
    floats = cfg.model.latent_tokens * cfg.model.latent_dim
    bicubic = bicubic_baseline(images, floats)
    pca = pca_for_source(cfg.data.source, cfg.model.image_size, floats)
    pca_recon = pca_baseline(pca, images)
    models = [("teacher", teacher), ("student", student)]
    shipped = f"{cfg.name}-student"
    if shipped in BUNDLED:  # what the shipped model of this preset does with the same images
        tok = Tokenizer.from_pretrained(shipped, device=device)
        if tok.config.image_size == cfg.model.image_size:
            models.append(("shipped_student", tok))
    decoded = {}
    for name, tok in models:
        recon, decode_s = reconstruct_images(tok, images, seed=0)
        passes = tok.passes_per_image(tok.default_steps(), tok.resolve_guidance(None))
        decoded[name] = recon
        decoded[name + "_row"] = {**quality(recon, images, names), "steps_per_stage": list(tok.default_steps()),
                                  "cfg": tok.config.sampling.cfg, "decoder_passes": passes,
                                  "decode_seconds_per_image": round(decode_s, 5)}
    teacher_row, student_row = decoded["teacher_row"], decoded["student_row"]
    results = {
        "preset": cfg.name,
        "device": device,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "stage1": {"steps": summary1["steps"], "seconds": round(summary1["seconds"], 1),
                   "batch_size": cfg.train.batch_size, "final_loss": summary1["last"].get("loss")},
        "stage2": {"steps": summary2["steps"], "seconds": round(summary2["seconds"], 1),
                   "batch_size": cfg2.distill.batch_size, "discriminator": cfg2.distill.discriminator,
                   "perceptual": cfg2.distill.perceptual if cfg2.distill.lambda_perc > 0 else "none",
                   "lambda_pix": cfg2.distill.lambda_pix},
        "eval_set": {"images": len(names), "source": "embedded held-out photos (chelsea, rocket, flower): whole "
                     "photo centre crops + 2x2 and 3x3 tiles, never seen in training",
                     "resolution": cfg.model.image_size},
        "latent": {"tokens": cfg.model.latent_tokens, "channels": cfg.model.latent_dim, "floats": floats},
        "teacher": teacher_row,
        "student": student_row,
        "student_vs_teacher": {
            "psnr_diff_db": round(student_row["psnr"] - teacher_row["psnr"], 3),
            "pass_ratio": round(teacher_row["decoder_passes"] / student_row["decoder_passes"], 2),
            "speedup": round(teacher_row["decode_seconds_per_image"] / student_row["decode_seconds_per_image"], 2),
        },
        "bicubic": {**quality(bicubic, images, names), "side": bicubic_side(floats),
                    "floats": 3 * bicubic_side(floats) ** 2},
        "pca": {**quality(pca_recon, images, names), "components": floats, "floats": floats,
                "fitted_on": f"{default_pca_crops()} training crops of data.source={cfg.data.source}"},
    }
    if "shipped_student_row" in decoded:
        results["shipped_student"] = {**decoded["shipped_student_row"], "model": shipped}
    report_dir.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(names)), key=lambda i: ("_" in names[i], i))[:12]  # whole photos first
    columns = [images, bicubic, pca_recon, decoded["teacher"], decoded["student"]]
    labels = ["real", "bicubic", "PCA", "teacher", "student"]
    if "shipped_student" in decoded:
        columns.append(decoded["shipped_student"])
        labels.append("shipped")
    save_grid([c[order] for c in columns], report_dir / "grid.png", labels=labels)
    (report_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = render_summary(results, time.monotonic() - t_start)
    (report_dir / "summary.md").write_text(summary)
    print(summary)
    return results


def render_summary(r: dict, total_s: float) -> str:
    rows = []
    labels = [("teacher", "msdd teacher (stage 1, trained here)"), ("student", "msdd student (stage 2, trained here)")]
    if "shipped_student" in r:
        labels.append(("shipped_student", f"shipped {r['shipped_student']['model']} (pretrained)"))
    for key, label in labels:
        m = r[key]
        rows.append(f"| {label}, steps {m['steps_per_stage']}, cfg {m['cfg']} | {r['latent']['floats']} | "
                    f"{m['psnr']:.2f} | {m['ssim']:.3f} | {m['psnr_whole_photos']:.2f} | {m['decoder_passes']} | "
                    f"{m['decode_seconds_per_image']:.4f} |")
    b, pca, sv = r["bicubic"], r["pca"], r["student_vs_teacher"]
    lines = [
        f"# msdd demo ({r['preset']}, {r['device']}, {r['machine']})",
        "",
        f"Stage 1: {r['stage1']['steps']} steps (batch {r['stage1']['batch_size']}) in {r['stage1']['seconds']:.0f} s. "
        f"Stage 2: {r['stage2']['steps']} steps (batch {r['stage2']['batch_size']}, {r['stage2']['discriminator']} "
        f"discriminator, perceptual: {r['stage2']['perceptual']}, pixel loss weight {r['stage2']['lambda_pix']:g}) in "
        f"{r['stage2']['seconds']:.0f} s. "
        f"Whole demo: {total_s / 60:.1f} min.",
        f"Evaluated on {r['eval_set']['images']} held-out images at {r['eval_set']['resolution']} px "
        f"({r['eval_set']['source']}).",
        "",
        "| decoder | floats | PSNR (dB) | SSIM | PSNR whole photos | decoder passes | decode s/img |",
        "|---|---|---|---|---|---|---|",
        *rows,
        f"| bicubic {b['side']}x{b['side']} -> up | {b['floats']} | {b['psnr']:.2f} | {b['ssim']:.3f} | "
        f"{b['psnr_whole_photos']:.2f} | - | - |",
        f"| PCA, {pca['components']} components ({pca['fitted_on']}) | {pca['floats']} | {pca['psnr']:.2f} | "
        f"{pca['ssim']:.3f} | {pca['psnr_whole_photos']:.2f} | - | - |",
        "",
        f"Student vs teacher: {sv['psnr_diff_db']:+.2f} dB PSNR with {sv['pass_ratio']:g}x fewer decoder passes, "
        f"{sv['speedup']:g}x faster decode (measured in this run).",
        *[f"The {key} is {abs(r[key]['psnr'] - base['psnr']):.2f} dB "
          f"{'above' if r[key]['psnr'] >= base['psnr'] else 'below'} the {label} baseline at the same number of floats."
          for key in ("teacher", "student") for base, label in ((b, "bicubic"), (pca, "PCA"))],
        "Grid (real | bicubic | PCA | teacher | student" + (" | shipped student" if "shipped_student" in r else "")
        + "): report/grid.png",
        "",
    ]
    return "\n".join(lines)
