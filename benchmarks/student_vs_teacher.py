"""The student / teacher ratio (issue 16) split into the blocks op and the rest: one-step student and many-step
teacher decodes of random paper-256 weights, interleaved in one process, each timed whole and inside
`msdd.models.cpu_kernels.blocks` (the op that runs a pass's MMDiT blocks on the optimised CPU path).

    python benchmarks/student_vs_teacher.py --dtype bf16 --rounds 3 --out benchmarks/results/student-vs-teacher-bf16.json

A round is `--student-decodes` student decodes, then one teacher decode (`--steps` per stage, `--cfg`); medians over
the rounds. The ratio of the blocks' times says how efficient a batch-1 pass is against the teacher's guided batch-2
passes; the rest (noise, renoise, patch embedding, final layer, the sampler, Python) is what each pays outside them.
CPU only; the optimised path (bf16: weights stored in bf16, as `Tokenizer.decode(bf16=True)`).
"""

import argparse
import json
import statistics
import time

import torch

import msdd.malloc
from msdd.config import load_config
from msdd.eval.bench.contenders import flow_contender
from msdd.eval.bench.models import FlowModel
from msdd.models import cpu_kernels
from msdd.models.precision import cast_weights
from msdd.tokenizer import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper-256")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--student-decodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if cpu_kernels.library() is None:
        raise SystemExit("msdd's CPU kernels are not available here (x86 with AVX512-BF16 and a C++ compiler needed)")
    msdd.malloc.tune()
    model = FlowModel.random(load_config(args.preset).model, torch.device("cpu"))
    bf16 = args.dtype == "bf16"
    if bf16:
        cast_weights(model.decoder, torch.bfloat16)
    stages = model.config.flow.num_stages
    z = torch.randn(1, *model.config.latent_shape, generator=torch.Generator().manual_seed(0))
    student = flow_contender("student", model, model.decoder, z, (1,) * stages, 1.0)
    teacher = flow_contender("teacher", model, model.decoder, z, (args.steps,) * stages, args.cfg)

    inside = [0.0]
    real = cpu_kernels.blocks

    def timed_blocks(*a):
        t0 = time.perf_counter()
        out = real(*a)
        inside[0] += time.perf_counter() - t0
        return out

    cpu_kernels.blocks = timed_blocks  # fused_blocks calls it through the module
    times = {"student": ([], []), "teacher": ([], [])}
    try:
        with torch.inference_mode(), autocast(torch.device("cpu"), bf16):
            student.decode(), teacher.decode()
            for _ in range(args.rounds):
                for name, contender, n in (("student", student, args.student_decodes), ("teacher", teacher, 1)):
                    for _ in range(n):
                        inside[0] = 0.0
                        t0 = time.perf_counter()
                        contender.decode()
                        times[name][0].append(time.perf_counter() - t0)
                        times[name][1].append(inside[0])
    finally:
        cpu_kernels.blocks = real
    if not times["student"][1][0]:
        raise SystemExit("the blocks op did not run (a decode block by block): no split to report")
    result = {"preset": args.preset, "dtype": args.dtype, "rounds": args.rounds, "steps": args.steps, "cfg": args.cfg,
              "threads": torch.get_num_threads()}
    for name, (whole, blocks) in times.items():
        w, b = statistics.median(whole), statistics.median(blocks)
        result[name] = {"decode_s": w, "blocks_s": b, "outside_s": w - b}
    s, t = result["student"], result["teacher"]
    result["ratio_whole"] = t["decode_s"] / s["decode_s"]
    result["ratio_blocks"] = t["blocks_s"] / s["blocks_s"]
    print(f"{args.dtype}: student {s['decode_s'] * 1e3:.1f} ms (blocks {s['blocks_s'] * 1e3:.1f}, outside "
          f"{s['outside_s'] * 1e3:.2f}); teacher {t['decode_s']:.3f} s (blocks {t['blocks_s']:.3f}, outside "
          f"{t['outside_s'] * 1e3:.0f} ms); student / teacher {result['ratio_whole']:.2f}, in the blocks op "
          f"{result['ratio_blocks']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
