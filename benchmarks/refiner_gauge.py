"""Can a nonlinear decoder of the PCA code beat the PCA code on held-out photos? (issue 12)

    python benchmarks/refiner_gauge.py --source embedded+wallpaper-photos --width 48 --blocks 4 \
        --steps 900 --out benchmarks/results/reconstruct/refiner-gauge.json

The encoder is the fixed PCA-256 code (fitted on 20,000 embedded training crops, the baseline every
report uses); the decoder is x_lin + f(x_lin) with f the residual conv net of `model.refiner_width`
(msdd.models.linear.Refiner, starting at zero), trained with MSE on random training crops of `--source`
(batch 16, AdamW lr 1e-3, EMA 0.99). Every 150 steps the EMA weights decode the 42 embedded held-out
images (never trained on), rounded to 8 bits like every report. Nothing of the tokenizer trains here:
this isolates what a small nonlinear decode of a fixed linear code buys at CPU scale.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from msdd.data import embedded_eval_set
from msdd.eval.baselines import pca_for_source, training_crops
from msdd.eval.metrics import psnr_per_image, quantize
from msdd.models.linear import Refiner, pca_reconstruct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="embedded")
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--crops", type=int, default=30000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    pca = pca_for_source("embedded", 64, 256)
    held, _ = embedded_eval_set(64)
    held_lin = pca_reconstruct(pca, held)
    pca_psnr = psnr_per_image(quantize(held_lin.clamp(-1, 1)), held).mean().item()
    crops = training_crops(a.source, 64, a.crops, seed=5)
    lin = pca_reconstruct(pca, crops)
    net = Refiner(a.width, a.blocks)
    ema = Refiner(a.width, a.blocks)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    curve, t0 = [], time.monotonic()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(crops), (16,), generator=g)
        loss = F.mse_loss(net(lin[idx]), crops[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, e in zip(net.parameters(), ema.parameters()):
                e.lerp_(p, 0.01)
        if step % 150 == 0 or step == a.steps:
            with torch.no_grad():
                out = ema(held_lin)
            psnr = psnr_per_image(quantize(out.clamp(-1, 1)), held).mean().item()
            curve.append({"step": step, "seconds": round(time.monotonic() - t0, 1), "held_out_psnr": round(psnr, 3)})
            print(curve[-1], flush=True)
    result = {"command": "python " + " ".join(sys.argv), "pca_held_out_psnr": round(pca_psnr, 3),
              "refiner_parameters": sum(p.numel() for p in net.parameters()), "curve": curve,
              "gain_db": round(curve[-1]["held_out_psnr"] - pca_psnr, 3)}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"PCA {pca_psnr:.2f} dB -> PCA + refiner {curve[-1]['held_out_psnr']:.2f} dB ({result['gain_db']:+.2f})")


if __name__ == "__main__":
    main()
