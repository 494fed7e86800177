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

`--wall` times the decode by the wall clock instead of the profiler (whose per-op times misattribute oneDNN's
linear kernels here: a 1024-row MLP layer showed 255 GFLOP/s in the profiler and 449 by the clock): every `Linear`
call (an MLP's first layer with its SwiGLU gate, and a layer with its gated residual, where msdd's linear kernel
computes both) and every joint attention call between `time.perf_counter` reads, grouped per stage (image tokens)
into the image stream's and the context stream's linear layers and attention, each with its GFLOP/s, and the rest of
each decode (norms, modulation, SwiGLU's gate, noise, Python) as what the clock saw outside them. CPU only.

`--phases` times the optimised path itself, which runs each pass's MMDiT blocks in one call of msdd's kernels
(`msdd.models.fused_blocks`), out of reach of module hooks: it loads the kernels' variant with phase clocks
(`MSDD_CPU_KERNELS=phases`, `msdd.models.cpu_kernels.phase_times`) and reports, per stage, the blocks op's time in
each phase (adaLN; the qkv layers with q / k norm, RoPE and packing; the attention; the output projections, the MLPs'
first and second layers, each with what the kernel does in their epilogue), with their GFLOP/s, the op's time outside
its phases, and the decode's time outside the op (patch embedding, context embedding, final layer, noise, renoise,
the sampler, Python). CPU only.

Every mode runs with the `msdd` command's glibc malloc settings (`msdd.malloc.tune`), as `msdd bench` does.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import msdd.malloc
from msdd.config import load_config
from msdd.families import family_of
from msdd.models import cpu_kernels, layers
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
    ap.add_argument("--wall", action="store_true",
                    help="wall-clock times of the linear layers and attention per stage instead of the profiler's")
    ap.add_argument("--phases", action="store_true",
                    help="the blocks op's time per phase and stage (the kernels' variant with phase clocks)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    msdd.malloc.tune()
    if a.phases:
        if a.reference or a.wall or a.bound:
            ap.error("--phases times the optimised path alone: leave out --reference, --wall and --bound")
        os.environ[cpu_kernels.ENV] = "phases"  # before the process's first decode builds the kernels
        if cpu_kernels.library() is None:
            raise SystemExit("--phases needs msdd's CPU kernels (x86 with AVX512-BF16 and VNNI, a C++ compiler)")
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
    if a.wall or a.phases:
        result = (phase_breakdown(decode, a.rounds, decoder.blocks[0].img.mlp.w3.in_features) if a.phases
                  else wall_breakdown(decoder, decode, a.rounds))
        peak = measure_matmul_peak(torch.bfloat16 if a.dtype == "bf16" else torch.float32)  # right after
        result = with_peak(result, peak)
        result.update(command="python " + " ".join(sys.argv), preset=a.preset, dtype=a.dtype, batch_size=a.batch_size,
                      rounds=a.rounds, threads=torch.get_num_threads(), torch=torch.__version__,
                      malloc=msdd.malloc.settings())
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        return
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
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        result["bound"] = efficiency_bound(decode, groups, total, dtype)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    for g, v in result["groups"].items():
        print(f"{g:34s} {v['seconds']:8.3f} s  {100 * v['share']:5.1f}%")
    print(f"total self CPU time per decode: {total:.3f} s")
    for k, v in result.get("bound", {}).items():
        print(f"{k:48s} {v}")


def decode_seconds(decode, rounds: int) -> list[float]:
    """The seconds of `rounds` decodes, one after another."""
    seconds = []
    for _ in range(rounds):
        t = time.perf_counter()
        decode()
        seconds.append(time.perf_counter() - t)
    return seconds


def wall_breakdown(decoder: torch.nn.Module, decode, rounds: int) -> dict:
    """Seconds and GFLOP/s per decode, by the clock, of each stage's linear layers (image and context stream) and
    joint attention, and of the rest; the decode's own time without the timing hooks (with them, the blocks run block
    by block, `msdd.models.fused_blocks.run_blocks`, so that the hooks see every layer: the rest includes that path's
    Python)."""
    plain = decode_seconds(decode, rounds)
    seconds, flops = defaultdict(float), defaultdict(float)
    starts: dict[int, float] = {}
    stage = [0]  # the image tokens of the stage running, from its image stream's last linear layer

    def before(module, args):
        starts[id(module)] = time.perf_counter()

    def after(name):
        def hook(module, args, out):
            x = args[0]
            rows = x.numel() // x.shape[-1]
            stream = "context" if ".ctx." in name else "image" if ".img." in name else "other"
            if stream == "image" and x.dim() == 3:  # a block's image stream: the stage is its token count
                stage[0] = x.shape[-2]
            key = (stage[0], stream, "linear")
            seconds[key] += time.perf_counter() - starts.pop(id(module))
            flops[key] += 2 * rows * module.in_features * module.out_features
        return hook

    handles = []
    for name, module in decoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after(name))]
    names = {id(m): n for n, m in decoder.named_modules()}
    panel_forward = layers.Linear.panel_forward

    def timed_panel_forward(module, x, swiglu=False, **gated):  # a SwiGLU's first layer with its gate, a layer with
        if not (swiglu or gated):                                  # its gated residual: not module calls
            return panel_forward(module, x, swiglu)  # inside the layer's forward, timed by its hooks
        before(module, (x,))
        out = panel_forward(module, x, swiglu, **gated)
        if out is None:  # the kernel does not apply: the layer's own call follows, with its hooks
            starts.pop(id(module))
        else:
            after(names[id(module)])(module, (x,), out)
        return out

    layers.Linear.panel_forward = timed_panel_forward
    attention = layers.joint_attention

    def timed_attention(qkv_x, qkv_c, img, ctx, rope):
        t = time.perf_counter()
        out = attention(qkv_x, qkv_c, img, ctx, rope)
        key = (qkv_x.shape[1], "joint", "attention")
        seconds[key] += time.perf_counter() - t
        n, d = qkv_x.shape[1] + qkv_c.shape[1], qkv_x.shape[-1] // 3
        flops[key] += 4 * qkv_x.shape[0] * n * n * d
        return out

    layers.joint_attention = timed_attention
    try:
        hooked = decode_seconds(decode, rounds)
    finally:
        layers.joint_attention = attention
        layers.Linear.panel_forward = panel_forward
        for h in handles:
            h.remove()
    total = statistics.median(hooked)
    rows = [{"tokens": k[0], "stream": k[1], "kind": k[2], "seconds": s / rounds, "gflop": flops[k] / rounds / 1e9,
             "gflops": flops[k] / s / 1e9} for k, s in sorted(seconds.items())]
    return {"seconds_per_decode": statistics.median(plain), "seconds_per_decode_hooked": total,
            "gflop_per_decode": sum(flops.values()) / rounds / 1e9, "rows": rows,
            "rest_seconds": total - sum(seconds.values()) / rounds}


def phase_flops(batch: int, n_img: int, n_ctx: int, width: int, hidden: int, full: list[int]) -> dict[str, float]:
    """FLOPs of one call of the blocks op per phase: `full` its two flags per block (image, context stream; 0: the
    stream gives keys and values only); the attention's scores and values over the joint sequence, every query."""
    flops = dict.fromkeys(cpu_kernels.PHASES, 0.0)
    for i, whole in enumerate(full):
        rows = batch * (n_img if i % 2 == 0 else n_ctx)
        flops["qkv"] += 2 * rows * width * 3 * width
        if whole:
            flops["proj"] += 2 * rows * width * width
            flops["mlp1"] += 2 * rows * width * 2 * hidden
            flops["mlp2"] += 2 * rows * hidden * width
    flops["attention"] = len(full) // 2 * 4 * batch * (n_img + n_ctx) ** 2 * width
    return flops


def phase_breakdown(decode, rounds: int, hidden: int) -> dict:
    """Seconds per decode of the blocks op's phases per stage (image tokens), with their GFLOP/s, the op's time
    outside its phases, and the decode's outside the op; the decode's time without the op's wrapper too."""
    plain = decode_seconds(decode, rounds)
    seconds, flops = defaultdict(float), defaultdict(float)
    in_op = [0.0]  # the op's seconds in the decode running
    blocks = cpu_kernels.blocks

    def timed_blocks(x, ctx, params, full, heads, eps, qk_eps, rope, int8=False):
        cpu_kernels.phase_times()  # from here on
        t = time.perf_counter()
        out = blocks(x, ctx, params, full, heads, eps, qk_eps, rope, int8)
        elapsed = time.perf_counter() - t
        if out is not None:
            n = x.shape[1]
            seconds[(n, "op")] += elapsed
            in_op[0] += elapsed
            for phase, s in cpu_kernels.phase_times().items():
                seconds[(n, phase)] += s
            for phase, f in phase_flops(x.shape[0], n, ctx.shape[1], x.shape[-1], hidden, list(full)).items():
                flops[(n, phase)] += f
        return out

    timed, outside = [], []  # per decode: its time, its time outside the op
    cpu_kernels.blocks = timed_blocks
    try:
        for _ in range(rounds):
            in_op[0] = 0.0
            t = time.perf_counter()
            decode()
            timed.append(time.perf_counter() - t)
            outside.append(timed[-1] - in_op[0])
    finally:
        cpu_kernels.blocks = blocks
    if not seconds:
        raise SystemExit("the decode did not run the blocks op (the optimised CPU path does not apply here)")
    total = statistics.median(timed)
    stages = sorted({n for n, _ in seconds})
    rows = []
    for n in stages:
        for phase in cpu_kernels.PHASES:
            s, f = seconds[(n, phase)] / rounds, flops[(n, phase)] / rounds
            rows.append({"tokens": n, "stream": "both", "kind": phase, "seconds": s, "gflop": f / 1e9,
                         "gflops": f / s / 1e9 if s > 0 else 0.0})
        rest = (seconds[(n, "op")] - sum(seconds[(n, p)] for p in cpu_kernels.PHASES)) / rounds
        rows.append({"tokens": n, "stream": "both", "kind": "op, outside its phases", "seconds": rest, "gflop": 0.0,
                     "gflops": 0.0})
    op = sum(seconds[(n, "op")] for n in stages) / rounds
    return {"seconds_per_decode": statistics.median(plain), "seconds_per_decode_hooked": total,
            "gflop_per_decode": sum(flops.values()) / rounds / 1e9, "rows": rows, "blocks_op_seconds": op,
            "rest_seconds": statistics.median(outside)}


def with_peak(result: dict, peak: float) -> dict:
    """The breakdown's rates as fractions of the matmul peak (GFLOP/s), rounded, printed."""
    # the decode's FLOPs are those of the timed ops (norms, gates and modulation add < 1%)
    decode_s = result["seconds_per_decode"]
    result = {"matmul_peak_gflops": round(peak, 1), **result,
              "decode_fraction_of_peak": round(result["gflop_per_decode"] / decode_s / peak, 4),
              "rows": [{**r, "seconds": round(r["seconds"], 5), "gflop": round(r["gflop"], 3),
                        "gflops": round(r["gflops"], 1), "fraction_of_peak": round(r["gflops"] / peak, 4),
                        "share_of_decode": round(r["seconds"] / result["seconds_per_decode_hooked"], 4)}
                       for r in result["rows"]]}
    for key in ("seconds_per_decode", "seconds_per_decode_hooked", "gflop_per_decode", "rest_seconds",
                "blocks_op_seconds"):
        if key in result:
            result[key] = round(result[key], 4)
    for r in result["rows"]:
        print(f"{r['tokens']:5d} tokens  {r['stream']:8s} {r['kind']:22s} {1e3 * r['seconds']:8.2f} ms "
              f"({100 * r['share_of_decode']:4.1f}%) {r['gflops']:7.1f} GFLOP/s "
              f"{100 * r['fraction_of_peak']:5.1f}% of the peak")
    rest = ("outside the blocks op (embeddings, final layer, noise, renoise, sampler, Python)"
            if "blocks_op_seconds" in result else "rest (norms, modulation, gates, noise, Python)")
    print(f"{rest}: {1e3 * result['rest_seconds']:.1f} ms; decode "
          f"{1e3 * decode_s:.1f} ms ({1e3 * result['seconds_per_decode_hooked']:.1f} ms timed), "
          f"{100 * result['decode_fraction_of_peak']:.1f}% "
          f"of the matmul peak {peak:.1f} GFLOP/s")
    return result


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
