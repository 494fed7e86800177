"""The fused attention kernel (msdd.models.cpu_kernels) against PyTorch's CPU flash kernel, in isolation.

    python benchmarks/attention_kernels.py --out benchmarks/results/attention-kernels.json

Per dtype (bf16, float32) and sequence length (the paper-256 decoder's stages have 144, 192, 384 and 1152
tokens; 37 is a small one), 12 heads of 64, batch 1: the median of `--repeats` calls of each kernel,
interleaved in rotated order (`msdd bench`'s timing), their GFLOP/s (4 N^2 D per head), the ratio, and each
one's max abs error against float64 attention; the matmul peak of each dtype measured in the same process beside them (the machine's speed moves
5-10% from one run to the next, so compare the two kernels within a run).
"""

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from msdd.eval.bench.peak import measure_matmul_peak
from msdd.eval.bench.timing import time_contenders
from msdd.models import cpu_kernels

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sdpa(q, k, v):
    b, h, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[37, 144, 192, 384, 1152])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if cpu_kernels.library() is None:
        sys.exit("the fused attention kernel is not available here (needs AVX512-BF16 and a C++ compiler)")
    rows, peaks = [], {}
    g = torch.Generator().manual_seed(0)
    for name, dtype in DTYPES.items():
        peaks[name] = round(measure_matmul_peak(dtype), 1)
        for n in a.tokens:
            q, k, v = [(torch.randn(1, a.heads, n, a.head_dim, generator=g) * 1.5).to(dtype) for _ in range(3)]
            exact = sdpa(q.double(), k.double(), v.double())
            kernels = {"flash": lambda: sdpa(q, k, v), "fused": lambda: cpu_kernels.library().attention(q, k, v)}
            times, _, _ = time_contenders(kernels, rounds=a.repeats, warmup=1, device=torch.device("cpu"),
                                          log=lambda msg: None)
            with torch.inference_mode():
                errors = {kname: (fn().double() - exact).abs().max().item() for kname, fn in kernels.items()}
            gflop = 4 * n * n * a.head_dim * a.heads / 1e9
            med = {kname: statistics.median(ts) for kname, ts in times.items()}
            rows.append({"dtype": name, "tokens": n, **{f"{kname}_ms": round(1e3 * s, 3) for kname, s in med.items()},
                         **{f"{kname}_gflops": round(gflop / s, 1) for kname, s in med.items()},
                         "fused_over_flash": round(med["flash"] / med["fused"], 3),
                         **{f"{kname}_max_abs_error": float(f"{e:.3g}") for kname, e in errors.items()}})
            r = rows[-1]
            print(f"{name} {n:5d} tokens: flash {r['flash_gflops']:6.1f} GFLOP/s, fused {r['fused_gflops']:6.1f} "
                  f"(x{r['fused_over_flash']:.2f}); max abs error {r['flash_max_abs_error']:.2g} / "
                  f"{r['fused_max_abs_error']:.2g}; peak {peaks[name]}")
    result = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "heads": a.heads, "head_dim": a.head_dim, "matmul_peak_gflops": peaks, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
