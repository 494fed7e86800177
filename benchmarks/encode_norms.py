"""An encode with the encoder's affine LayerNorms as modulation vectors of the fused kernels (`Stream.affine_mods`:
adaLN and the gated residuals in msdd's CPU kernels, as the decoders' modulated streams run; now) against the norms
as modules and the residuals as PyTorch adds (before), alternated encode by encode (each first in every other round)
in one process on one encoder with random weights, beside the machine's matmul peak probed before and after.

    python benchmarks/encode_norms.py --preset paper-256 --dtype bf16 --batch-size 1 --rounds 8 --out encode.json

Medians in ms per batch; GFLOP/s and % of the peak from the encoder's FLOPs (`msdd.eval.flops.count_flops`).
"""

import argparse
import json
import statistics
import time

import torch

import msdd.malloc
from msdd.config import load_config
from msdd.eval.bench.peak import measure_matmul_peak
from msdd.eval.flops import count_flops
from msdd.families import family_of
from msdd.models.layers import Stream
from msdd.models.precision import cast_weights
from msdd.tokenizer import autocast

VARIANTS = ("norms as modules (before)", "norms as modulation vectors (now)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper-256")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8, help="timed encodes of each variant (after 2 warm-up rounds)")
    ap.add_argument("--out", help="write the medians as JSON here")
    args = ap.parse_args()
    msdd.malloc.tune()
    bf16 = args.dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = load_config(args.preset)
    family = family_of(cfg.model)
    r = cfg.model.image_size
    flops = count_flops(family.build_encoder(), torch.zeros(1, 3, r, r)) * args.batch_size
    encoder = family.build_encoder().eval()
    cast_weights(encoder, torch.bfloat16 if bf16 else None)
    images = torch.rand(args.batch_size, 3, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1
    affine_mods = Stream.affine_mods
    peaks = [measure_matmul_peak(dtype)]
    times = {name: [] for name in VARIANTS}
    for i in range(2 + args.rounds):
        for name in VARIANTS if i % 2 else VARIANTS[::-1]:  # each first in every other round
            Stream.affine_mods = affine_mods if name == VARIANTS[1] else (lambda self, x: None)
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(images.device, bf16):
                encoder(images)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    Stream.affine_mods = affine_mods
    peaks.append(measure_matmul_peak(dtype))
    peak = max(peaks)
    rows = {}
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        rows[name] = {"ms": round(ms, 1), "gflops": round(flops / ms / 1e6, 1),
                      "fraction_of_peak": round(flops / ms / 1e6 / peak, 4)}
    before, now = (rows[name]["ms"] for name in VARIANTS)
    print(f"{args.preset} encoder, {args.dtype}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{flops / 1e9:.1f} GFLOP a batch, matmul peak {peak:.1f} GFLOP/s (probes {peaks[0]:.1f}, {peaks[1]:.1f}); "
          f"alternated, medians of {args.rounds}:")
    for name, row in rows.items():
        print(f"  {name:36s} {row['ms']:8.1f} ms  {row['gflops']:6.1f} GFLOP/s  {100 * row['fraction_of_peak']:5.1f}%")
    print(f"  now / before: x{before / now:.3f} faster")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "dtype": args.dtype, "batch_size": args.batch_size,
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "gflop": flops / 1e9,
                       "peak_probes": peaks, "rows": rows, "speedup": round(before / now, 4)}, f, indent=1)


if __name__ == "__main__":
    main()
