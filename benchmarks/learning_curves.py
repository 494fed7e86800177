"""Learning curves of a tiny-64 recipe: held-out vs training-crop PSNR over training steps (issue 12).

    python benchmarks/learning_curves.py --run-dir RUN --steps 600 --every 300 --set KEY=VALUE ... --out curve.json

Trains stage 1 (msdd train's own trainer and checkpoints; an existing run directory continues), then
evaluates the EMA weights of every kept checkpoint and of the final model on the 42 embedded held-out
images and on 256 training crops (a crop seed the trainer does not use), with one step per stage and
with the model's default schedule (decode seed 0, fp32). PCA with as many components as the latent has
floats (fitted on 20,000 training crops) and bicubic are measured on the same images. Writes JSON with
the command.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from msdd.config import config_from_json, load_config
from msdd.data.embedded import embedded_eval_set
from msdd.eval.baselines import pca_for_source, training_crops
from msdd.eval.metrics import bicubic_baseline, psnr_per_image, quantize, ssim_per_image
from msdd.models.linear import pca_reconstruct
from msdd.tokenizer import Tokenizer
from msdd.train.checkpoint import list_checkpoints, load_checkpoint
from msdd.train.stage1 import Stage1Trainer


def score(recon: torch.Tensor, images: torch.Tensor) -> dict:
    recon = quantize(recon.clamp(-1, 1))
    return {"psnr": round(psnr_per_image(recon, images).mean().item(), 3),
            "ssim": round(ssim_per_image(recon, images).mean().item(), 4)}


@torch.no_grad()
def measure(tok: Tokenizer, sets: dict) -> dict:
    schedules = {"one_step": None}
    if tok.family.multi_scale:
        schedules = {"one_step": [1] * tok.config.flow.num_stages, "default": list(tok.config.sampling.steps)}
    out = {}
    for name, images in sets.items():
        z = tok.encode(images)
        for label, steps in schedules.items():
            x = tok.decode(z, steps=steps, generator=torch.Generator().manual_seed(0))
            out[f"{name}_{label}"] = score(x, images)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-64")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, required=True, help="checkpoint (and measure) every N steps")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    over = [*args.overrides, f"train.max_steps={args.steps}", f"train.ckpt_every={args.every}",
            f"train.grid_every={args.steps}", f"train.keep_checkpoints={args.steps // args.every + 1}"]
    cfg = load_config(args.preset, over)
    t0 = time.monotonic()
    summary = Stage1Trainer(cfg, args.run_dir).fit(progress=False)
    train_s = time.monotonic() - t0
    r = cfg.model.image_size
    held, _ = embedded_eval_set(r)
    sets = {"heldout": held, "train": training_crops(cfg.data.source, r, 256, seed=999)}
    floats = cfg.model.latent_tokens * cfg.model.latent_dim
    pca = pca_for_source(cfg.data.source, r, floats)
    baselines = {name: {"pca": score(pca_reconstruct(pca, x), x), "bicubic": score(bicubic_baseline(x, floats), x)}
                 for name, x in sets.items()}
    points = []
    for path in list_checkpoints(args.run_dir):
        weights, state, cfg_json = load_checkpoint(path)
        tok = Tokenizer(config_from_json(cfg_json).model)
        tok.load_state_dict(weights["ema"])
        points.append({"step": int(state["step"]), "train_seconds": round(state.get("train_seconds", 0.0), 1),
                       **measure(tok.eval(), sets)})
        print(json.dumps(points[-1]), flush=True)
    record = {"command": " ".join(["python"] + sys.argv), "overrides": args.overrides, "steps": summary["steps"],
              "wall_seconds": round(train_s, 1), "baselines": baselines, "points": points}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
