"""`msdd demo`: the whole path on the embedded photographs, on a CPU, in a bounded time.

1. train the tiny preset (stage 1) on random crops of the embedded training photos for `minutes`;
2. reconstruct the held-out photos (never seen in training) with the trained tokenizer;
3. compare with a bicubic down/up baseline that keeps as many floats as the latent;
4. write <out>/report/: grid.png, metrics.json, summary.md (also printed).
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
from msdd.train.stage1 import Stage1Trainer, measure_step_time


def budgeted_config(cfg: Config, minutes: float, device: str) -> tuple[Config, float]:
    """Fit train.max_steps (and warm-up) to a wall-time budget from a measured step time, so the LR
    schedule completes within the budget."""
    step_s = measure_step_time(cfg, device=device)
    steps = max(10, int(minutes * 60 / step_s * 0.95))
    train = replace(cfg.train, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10),
                    ckpt_every=max(50, steps // 10), grid_every=max(50, steps // 5))
    return replace(cfg, train=train), step_s


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
    run_dir, report_dir = out / "run", out / "report"
    t_start = time.monotonic()
    if (run_dir / "config.json").exists():  # continue an interrupted demo with its own schedule
        cfg = config_from_json((run_dir / "config.json").read_text())
        step_s = None
        print(f"continuing the demo run in {run_dir}")
    else:
        cfg, step_s = budgeted_config(load_config(preset, list(overrides)), minutes, device)
        print(f"measured {step_s:.2f} s per training step at batch {cfg.train.batch_size}: "
              f"training {cfg.train.max_steps} steps (~{minutes:g} min)")
    trainer = Stage1Trainer(cfg, run_dir, device=device)
    train_summary = trainer.fit(progress=progress)
    tok = Tokenizer.from_pretrained(run_dir / "model", device=device)

    images, names = embedded_eval_set(cfg.model.image_size)
    recon, decode_s = reconstruct_images(tok, images, seed=0)
    floats = cfg.model.latent_tokens * cfg.model.latent_dim
    bicubic = bicubic_baseline(images, floats)
    results = {
        "preset": cfg.name,
        "device": device,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "train": {"steps": train_summary["steps"], "seconds": round(train_summary["seconds"], 1),
                  "seconds_per_step_measured": step_s, "batch_size": cfg.train.batch_size,
                  "final_loss": train_summary["last"].get("loss")},
        "eval_set": {"images": len(names), "source": "embedded held-out photos (chelsea, rocket, flower): whole "
                     "photo centre crops + 2x2 and 3x3 tiles, never seen in training",
                     "resolution": cfg.model.image_size},
        "latent": {"tokens": cfg.model.latent_tokens, "channels": cfg.model.latent_dim, "floats": floats},
        "tokenizer": {**quality(recon, images, names), "steps_per_stage": list(tok.default_steps()),
                      "cfg": tok.config.sampling.cfg, "decoder_passes": sum(tok.default_steps()),
                      "decode_seconds_per_image": round(decode_s, 4)},
        "bicubic": {**quality(bicubic, images, names), "side": bicubic_side(floats),
                    "floats": 3 * bicubic_side(floats) ** 2},
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(names)), key=lambda i: ("_" in names[i], i))[:12]  # whole photos first
    save_grid([images[order], bicubic[order], recon[order]], report_dir / "grid.png")
    (report_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = render_summary(results, time.monotonic() - t_start)
    (report_dir / "summary.md").write_text(summary)
    print(summary)
    return results


def render_summary(r: dict, total_s: float) -> str:
    t, b = r["tokenizer"], r["bicubic"]
    gain = t["psnr"] - b["psnr"]
    lines = [
        f"# msdd demo ({r['preset']}, {r['device']})",
        "",
        f"Trained {r['train']['steps']} steps (batch {r['train']['batch_size']}) in {r['train']['seconds']:.0f} s; "
        f"final loss {r['train']['final_loss']:.4f}. Whole demo: {total_s / 60:.1f} min.",
        f"Evaluated on {r['eval_set']['images']} held-out images at {r['eval_set']['resolution']} px "
        f"({r['eval_set']['source']}).",
        "",
        "| decoder | floats | PSNR (dB) | SSIM | PSNR whole photos | passes | decode s/img |",
        "|---|---|---|---|---|---|---|",
        f"| msdd tokenizer ({t['steps_per_stage']} steps, cfg {t['cfg']}) | {r['latent']['floats']} | {t['psnr']:.2f} | "
        f"{t['ssim']:.3f} | {t['psnr_whole_photos']:.2f} | {t['decoder_passes']} | {t['decode_seconds_per_image']:.3f} |",
        f"| bicubic {b['side']}x{b['side']} -> up | {b['floats']} | {b['psnr']:.2f} | {b['ssim']:.3f} | "
        f"{b['psnr_whole_photos']:.2f} | - | - |",
        "",
        f"The tokenizer is {abs(gain):.2f} dB {'above' if gain >= 0 else 'below'} the bicubic baseline "
        "at the same number of floats.",
        "Grid (real | bicubic | msdd): report/grid.png",
        "",
    ]
    return "\n".join(lines)
