"""Where a stage-1 training step's time goes: forward, backward, gradient clipping, the AdamW step, the EMA update,
for two variants of the step alternated step by step in one process on two copies of one model:
`--compare attention`: the CPU attention in bf16 (before) and in float32 up to `FP32_CPU_ATTENTION_MAX_KEYS` keys
(msdd.models.layers, now); `--compare adamw`: PyTorch's per-tensor AdamW (its CPU default, before) and its fused one
(now); `--compare compile`: the encoder's and decoder's blocks as they are and compiled as `train.compile` does
(`msdd.models.compiling.compile_blocks`; the first step, which compiles them, reported apart). `--compare sdpa`:
`F.scaled_dot_product_attention` alone, forward and backward, in bf16 and float32 at keys x head sizes around
`FP32_CPU_ATTENTION_MAX_KEYS` (where its value comes from).

    python benchmarks/train_step.py --preset tiny-64 --compare attention --steps 12 --out train-step.json

The step is the trainer's (`Stage1Trainer.micro_step` / `optimizer_step`: autocast as the preset, the linear path's
parameter group as `make_optimizer` builds it) on random images, without the data stream. Medians in ms.
"""

import argparse
import copy
import json
import statistics
import time

import torch

import msdd.malloc
from msdd.config import load_config
from msdd.models import layers
from msdd.models.compiling import compile_blocks
from msdd.tokenizer import Tokenizer, autocast
from msdd.train.ema import EMA
from msdd.train.optim import make_optimizer
from msdd.train.stage1 import linear_path_parameters

PARTS = ("forward", "backward", "clip", "adamw", "ema")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-64")
    ap.add_argument("--compare", choices=("attention", "adamw", "compile", "sdpa"), default="attention")
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each variant (after 2 warm-up steps)")
    ap.add_argument("--out", help="write the medians as JSON here")
    args = ap.parse_args()
    msdd.malloc.tune()
    if args.compare == "sdpa":
        return sdpa_table(args.out)
    cfg = load_config(args.preset)
    tc, device = cfg.train, torch.device("cpu")
    torch.manual_seed(tc.seed)
    base = Tokenizer(cfg.model)
    names = {"attention": ("bf16 attention", "fp32 attention"), "adamw": ("per-tensor AdamW", "fused AdamW"),
             "compile": ("eager", "compiled")}[args.compare]
    max_keys = {"bf16 attention": 0}  # the other variants: the module's own limit
    runs = {}
    for name in names:
        tok = copy.deepcopy(base)
        opt = make_optimizer(tok.parameters(), tc.lr, tc.betas, tc.weight_decay, slow=linear_path_parameters(tok),
                             slow_scale=tc.linear_lr_scale)
        if name == "per-tensor AdamW":  # the same groups and settings, PyTorch's CPU default
            opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "fused"} for g in opt.param_groups],
                                    foreach=False)
        if name == "compiled":
            compile_blocks(tok, device)
        runs[name] = (tok, opt, EMA(tok, tc.ema_decay, tc.ema_warmup), [p for p in tok.parameters() if p.requires_grad])
    limit = layers.FP32_CPU_ATTENTION_MAX_KEYS
    g = torch.Generator().manual_seed(0)
    images = torch.rand(tc.batch_size, 3, cfg.model.image_size, cfg.model.image_size, generator=g) * 2 - 1
    times = {name: {part: [] for part in (*PARTS, "step")} for name in runs}
    first_step = {}
    for i in range(2 + args.steps):
        for name, (tok, opt, ema, params) in runs.items():
            layers.FP32_CPU_ATTENTION_MAX_KEYS = max_keys.get(name, limit)
            marks = [time.perf_counter()]
            with autocast(device, tc.bf16):
                loss, _ = tok.training_loss(images, g)
            marks.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            marks.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            marks.append(time.perf_counter())
            opt.step()
            marks.append(time.perf_counter())
            ema.update(tok)
            marks.append(time.perf_counter())
            if i == 0:
                first_step[name] = round(marks[-1] - marks[0], 2)  # compiles the compiled variant's graphs
            if i >= 2:
                for part, a, b in zip(PARTS, marks, marks[1:]):
                    times[name][part].append((b - a) * 1e3)
                times[name]["step"].append((marks[-1] - marks[0]) * 1e3)
    layers.FP32_CPU_ATTENTION_MAX_KEYS = limit
    trained = sum(p.numel() for p in runs[names[1]][3])
    report({"preset": args.preset, "compare": args.compare, "fp32_cpu_attention_max_keys": limit,
            "batch_size": tc.batch_size, "bf16_autocast": tc.bf16, "steps": args.steps, "trained_parameters": trained},
           times, first_step, f"{args.preset}, batch {tc.batch_size}, bf16 autocast {tc.bf16}, {trained / 1e6:.2f} M "
           f"trained parameters, {args.steps} steps of each", args.out)


def report(settings: dict, times: dict, first_step: dict, header: str, out: str | None) -> None:
    """Print each variant's median times (ms) per part, and write them with `settings` as JSON to `out`."""
    ms = {name: {part: round(statistics.median(v), 2) for part, v in parts.items()} for name, parts in times.items()}
    print(header + ", alternated (ms, medians)")
    width = max(map(len, ms))
    for name, parts in ms.items():
        print(f"  {name:{width}s}  " + "  ".join(f"{part} {v:.1f}" for part, v in parts.items())
              + f"  (first step {first_step[name]:.1f} s)")
    if out:
        with open(out, "w") as f:
            json.dump({**settings, "first_step_s": first_step, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "ms": ms}, f, indent=1)


def sdpa_table(out: str | None) -> None:
    """Forward + backward of PyTorch's CPU SDPA in bf16 and float32, about equal work per shape (medians of 8, ms)."""
    rows = []
    for head in (32, 64):
        for keys in (96, 288, 576, 1152):
            shape = (max(1, 32 * 96 * 96 // keys**2) * (2 if head == 32 else 1), 4 if head == 32 else 6, keys, head)
            ms = {name: _sdpa_ms(shape, dtype) for name, dtype in (("bfloat16", torch.bfloat16),
                                                                   ("float32", torch.float32))}
            rows.append({"shape": shape, **ms, "bf16_over_fp32": round(ms["bfloat16"] / ms["float32"], 2)})
            print(f"(B, heads, keys, head) {shape}: bf16 {ms['bfloat16']:.2f} ms, float32 {ms['float32']:.2f} ms")
    if out:
        with open(out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


def _sdpa_ms(shape: tuple[int, ...], dtype: torch.dtype, rounds: int = 8) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_(True) for _ in range(3))
    grad = torch.randn(shape, generator=g).to(dtype)
    times = []
    for i in range(rounds + 2):
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


if __name__ == "__main__":
    main()
