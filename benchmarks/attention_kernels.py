"""The fused attention kernels (msdd.models.cpu_kernels) against PyTorch's CPU flash kernel, in isolation.

    python benchmarks/attention_kernels.py --out benchmarks/results/attention-kernels.json

Per dtype (bf16, float32) and sequence length (the paper-256 decoder's stages have 144, 192, 384 and 1152
tokens; 37 is a small one), 12 heads of 64, batch 1: the median of `--repeats` calls of each kernel,
interleaved in rotated order (`msdd bench`'s timing), their GFLOP/s (4 N^2 D per head), the ratio, and each
one's max abs error against float64 attention; the matmul peak of each dtype measured in the same process beside
them (the machine's speed moves 5-10% from one run to the next, so compare the kernels within a run).

A second comparison times an MMDiT block's whole attention step, from the two streams' qkv projections (N - 128
image tokens and 128 context tokens, as in a decoder stage) to each stream's output: `block_ops` splits the heads,
applies q_norm and k_norm, concatenates, runs the fused attention kernel with RoPE and slices the output (the
optimised path before the joint kernel), `block_joint` is `msdd.models.layers.joint_attention` on the joint kernel.
"""

import argparse
import contextlib
import copy
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from msdd.eval.bench.peak import measure_matmul_peak
from msdd.eval.bench.timing import time_contenders
from msdd.models import cpu_kernels
from msdd.models.layers import Stream, joint_attention
from msdd.models.rope import RopeCache

CONTEXT = 128  # context tokens of the paper decoder (its latent's 128 tokens)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sdpa(q, k, v):
    b, h, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


@contextlib.contextmanager
def without_joint_kernel():
    real = cpu_kernels.joint_attention
    cpu_kernels.joint_attention = lambda *args: None
    try:
        yield
    finally:
        cpu_kernels.joint_attention = real


def block_row(name: str, dtype: torch.dtype, n: int, heads: int, head_dim: int, repeats: int,
              g: torch.Generator) -> dict:
    """An MMDiT block's attention step, the joint kernel against the separate ops, and their errors."""
    width = heads * head_dim
    img, ctx = (Stream(width, heads, 4 * width, modulated=True, pre_only=False).eval() for _ in range(2))
    for norm in (img.q_norm, img.k_norm, ctx.q_norm, ctx.k_norm):
        torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=g)
        torch.nn.init.normal_(norm.bias, 0.0, 0.2, generator=g)
    grid = int((n - CONTEXT) ** 0.5)
    rope = RopeCache(32, CONTEXT, head_dim, "cross_both")(grid, torch.device("cpu"))
    x, c = ((torch.randn(1, m, 3 * width, generator=g) * 1.5).to(dtype) for m in (grid * grid, CONTEXT))

    def separate():
        with without_joint_kernel():
            return joint_attention(x, c, img, ctx, rope)

    kernels = {"block_ops": separate, "block_joint": lambda: joint_attention(x, c, img, ctx, rope)}
    with torch.inference_mode():
        times = time_contenders(kernels, rounds=repeats, warmup=1, device=torch.device("cpu"),
                                log=lambda msg: None).seconds
        img64, ctx64 = copy.deepcopy(img).double(), copy.deepcopy(ctx).double()
        exact = torch.cat(joint_attention(x.double(), c.double(), img64, ctx64, rope), dim=1)
        errors = {kname: (torch.cat(fn(), dim=1).double() - exact).abs().max().item() for kname, fn in kernels.items()}
    med = {kname: statistics.median(ts) for kname, ts in times.items()}
    return {"dtype": name, "tokens": n, **{f"{kname}_ms": round(1e3 * s, 3) for kname, s in med.items()},
            "joint_over_ops": round(med["block_ops"] / med["block_joint"], 3),
            **{f"{kname}_max_abs_error": float(f"{e:.3g}") for kname, e in errors.items()}}


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
    rows, block_rows, peaks = [], [], {}
    g = torch.Generator().manual_seed(0)
    for name, dtype in DTYPES.items():
        peaks[name] = round(measure_matmul_peak(dtype), 1)
        for n in a.tokens:
            q, k, v = [(torch.randn(1, a.heads, n, a.head_dim, generator=g) * 1.5).to(dtype) for _ in range(3)]
            exact = sdpa(q.double(), k.double(), v.double())
            kernels = {"flash": lambda: sdpa(q, k, v), "fused": lambda: cpu_kernels.library().attention(q, k, v)}
            times = time_contenders(kernels, rounds=a.repeats, warmup=1, device=torch.device("cpu"),
                                    log=lambda msg: None).seconds
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
            grid = int((n - CONTEXT) ** 0.5) if n > CONTEXT else 0
            if grid * grid + CONTEXT == n:  # a decoder stage: a square image grid and the context tokens
                block_rows.append(block_row(name, dtype, n, a.heads, a.head_dim, a.repeats, g))
                r = block_rows[-1]
                print(f"{name} {n:5d} tokens, block step: ops {r['block_ops_ms']:.2f} ms, "
                      f"joint {r['block_joint_ms']:.2f} "
                      f"(x{r['joint_over_ops']:.2f}); max abs error {r['block_ops_max_abs_error']:.2g} / "
                      f"{r['block_joint_max_abs_error']:.2g}")
    result = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "heads": a.heads, "head_dim": a.head_dim, "matmul_peak_gflops": peaks, "rows": rows,
              "block_rows": block_rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
