"""Where a student decode spends its time (issue 16, item 1): torch.profiler over one-step-per-stage decodes
of random paper-256 weights, CPU self time grouped into linear, attention, norms, modulation/elementwise,
noise and copies.

    python benchmarks/profile_student.py --preset paper-256 --batch-size 1 --dtype fp32 \
        --out benchmarks/results/profile/paper-256-fp32-b1.json

The optimised path by default (bf16: weights stored in bf16, as `Tokenizer.decode(bf16=True)`);
`--reference`: the reference path, bf16 as autocast over float32 weights.

`--bound` also measures, in the same process, the machine's matmul peak for the dtype and the decode's FLOPs
per op, and writes the rates of the linear layers and of attention as fractions of that peak, and the best
fraction of the peak a decode could reach with its linear layers as fast as they run here: attention at
the full matmul peak and every other op free (what the issue-16 targets of 90% / 85% of the peak need).
"""

import argparse
import contextlib
import json
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from msdd.config import load_config
from msdd.families import family_of
from msdd.models.layers import unoptimised
from msdd.eval.bench.peak import measure_matmul_peak
from msdd.eval.flops import flop_counter
from msdd.models.precision import cast_weights

GROUPS = [  # (group, substrings of aten op names), first match wins
    ("linear (matmul)", ("addmm", "aten::mm", "bmm", "matmul", "linear")),  # linear: oneDNN's _linear_pointwise
    ("attention", ("scaled_dot_product", "attention")),  # SDPA kernels and msdd_kernels::attention
    ("norms", ("layer_norm", "group_norm", "native_layer_norm", "adaln")),  # adaln: with modulation (and residual)
    ("noise", ("randn", "normal_", "uniform_")),
    ("copies / layout", ("copy_", "clone", "contiguous", "cat", "_to_copy", "permute", "reshape", "view",
                         "expand", "transpose", "stack", "unsqueeze", "slice", "select", "as_strided")),
    ("modulation / RoPE / elementwise", ("mul", "add", "sub", "silu", "gelu", "neg", "sigmoid", "exp", "cos",
                                         "sin", "div", "pow", "mean", "clamp", "where", "tanh", "sum", "swiglu")),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper-256")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reference", action="store_true",
                    help="profile the reference path (msdd.models.layers.unoptimised) and, for bf16, autocast over "
                         "float32 weights (what decode(bf16=True) ran before it kept bf16 weights)")
    ap.add_argument("--bound", action="store_true",
                    help="also the matmul peak, the FLOPs per op group and the best reachable fraction of the peak")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = load_config(a.preset).model
    family = family_of(cfg)
    torch.manual_seed(0)
    decoder = family.build_decoder().eval()
    if a.dtype == "bf16" and not a.reference:  # as Tokenizer.decode(bf16=True): weights stored in bf16
        cast_weights(decoder, torch.bfloat16)
    z = torch.randn(a.batch_size, *cfg.latent_shape)
    steps = (1,) * family.num_step_entries

    def decode():
        with (torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=a.dtype == "bf16"),
              unoptimised() if a.reference else contextlib.nullcontext()):
            family.sample(decoder, z, steps, 1.0, torch.Generator().manual_seed(0))

    decode()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.rounds):
            decode()
    ops = defaultdict(float)
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1e6 / a.rounds
    total = sum(ops.values())
    groups = defaultdict(float)
    for name, s in ops.items():
        groups[group_of(name)] += s
    result = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "seconds_per_decode": round(total, 3),
              "groups": {g: {"seconds": round(s, 3), "share": round(s / total, 4)}
                         for g, s in sorted(groups.items(), key=lambda kv: -kv[1])},
              "top_ops": [{"op": n, "seconds": round(s, 4), "share": round(s / total, 4)}
                          for n, s in sorted(ops.items(), key=lambda kv: -kv[1])[:15]]}
    if a.bound:
        result["bound"] = efficiency_bound(decode, groups, total, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    for g, v in result["groups"].items():
        print(f"{g:34s} {v['seconds']:8.3f} s  {100 * v['share']:5.1f}%")
    print(f"total self CPU time per decode: {total:.3f} s")
    for k, v in result.get("bound", {}).items():
        print(f"{k:48s} {v}")


def efficiency_bound(decode, groups: dict[str, float], total: float, dtype: torch.dtype) -> dict:
    """Fractions of the matmul peak (measured now): of the whole decode, of its linear layers and attention
    alone, and the best a decode could reach with the linear layers at their rate here, attention at the
    peak and every other op taking no time."""
    with unoptimised(), flop_counter() as counter:  # oneDNN's linear kernel has no FLOP formula: count nn.Linear
        decode()
    per_op = counter.get_flop_counts()["Global"]
    flops = sum(per_op.values())
    attention = sum(n for op, n in per_op.items() if group_of(str(op)) == "attention")
    linear = flops - attention
    peak = measure_matmul_peak(dtype) * 1e9
    t_linear, t_attention = groups["linear (matmul)"], groups["attention"]
    return {"matmul_peak_gflops": round(peak / 1e9, 1), "gflop_per_decode": round(flops / 1e9, 1),
            "attention_flop_share": round(attention / flops, 4),
            "decode_fraction_of_peak": round(flops / total / peak, 4),
            "linear_fraction_of_peak": round(linear / t_linear / peak, 4),
            "attention_fraction_of_peak": round(attention / t_attention / peak, 4),
            "best_fraction_with_these_linear_layers": round(flops / (t_linear + attention / peak) / peak, 4)}


if __name__ == "__main__":
    main()
