"""Where a stage-1 training step's time goes: forward, backward, gradient clipping, the AdamW step, the EMA update,
with PyTorch's per-tensor AdamW (its CPU default) and its fused one, alternated step by step in one process on two
copies of one model.

    python benchmarks/train_step.py --preset tiny-64 --steps 12 --out benchmarks/results/train-step-tiny-64.json

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
from msdd.tokenizer import Tokenizer, autocast
from msdd.train.ema import EMA
from msdd.train.optim import make_optimizer
from msdd.train.stage1 import linear_path_parameters

PARTS = ("forward", "backward", "clip", "adamw", "ema")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-64")
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each optimiser (after 2 warm-up steps)")
    ap.add_argument("--out", help="write the medians as JSON here")
    args = ap.parse_args()
    msdd.malloc.tune()
    cfg = load_config(args.preset)
    tc, device = cfg.train, torch.device("cpu")
    torch.manual_seed(tc.seed)
    base = Tokenizer(cfg.model)
    runs = {}
    for name in ("per-tensor", "fused"):
        tok = copy.deepcopy(base)
        opt = make_optimizer(tok.parameters(), tc.lr, tc.betas, tc.weight_decay, slow=linear_path_parameters(tok),
                             slow_scale=tc.linear_lr_scale)
        if name == "per-tensor":  # the same groups and settings, PyTorch's CPU default
            opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "fused"} for g in opt.param_groups],
                                    foreach=False)
        runs[name] = (tok, opt, EMA(tok, tc.ema_decay, tc.ema_warmup), [p for p in tok.parameters() if p.requires_grad])
    g = torch.Generator().manual_seed(0)
    images = torch.rand(tc.batch_size, 3, cfg.model.image_size, cfg.model.image_size, generator=g) * 2 - 1
    times = {name: {part: [] for part in (*PARTS, "step")} for name in runs}
    for i in range(2 + args.steps):
        for name, (tok, opt, ema, params) in runs.items():
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
            if i >= 2:
                for part, a, b in zip(PARTS, marks, marks[1:]):
                    times[name][part].append((b - a) * 1e3)
                times[name]["step"].append((marks[-1] - marks[0]) * 1e3)
    trained = sum(p.numel() for p in runs["fused"][3])
    result = {"preset": args.preset, "batch_size": tc.batch_size, "bf16_autocast": tc.bf16, "steps": args.steps,
              "trained_parameters": trained, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "ms": {name: {part: round(statistics.median(v), 2) for part, v in parts.items()}
                     for name, parts in times.items()}}
    print(f"{args.preset}, batch {tc.batch_size}, bf16 autocast {tc.bf16}, {trained / 1e6:.2f} M trained parameters, "
          f"{args.steps} steps of each, alternated (ms, medians)")
    for name, parts in result["ms"].items():
        print(f"  {name:10s} " + "  ".join(f"{part} {v:.1f}" for part, v in parts.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
