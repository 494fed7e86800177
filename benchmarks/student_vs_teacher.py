"""The student / teacher ratio (issue 16) split into the blocks op and the rest: one-step student and many-step
teacher decodes of random paper-256 weights, interleaved in one process, each timed whole and inside
`msdd.models.cpu_kernels.blocks` (the op that runs a pass's MMDiT blocks on the optimised CPU path).

    python benchmarks/student_vs_teacher.py --dtype bf16 --rounds 3 \
        --out benchmarks/results/student-vs-teacher-bf16.json

A round is `--student-decodes` student decodes, then one teacher decode (`--steps` per stage, `--cfg`); medians over
the rounds. The ratio of the blocks' times says how efficient a batch-1 pass is against the teacher's guided batch-2
passes; the rest (noise, renoise, patch embedding, final layer, the sampler, Python) is what each pays outside them.
CPU only; the optimised path (bf16: weights stored in bf16, as `Tokenizer.decode(bf16=True)`).

`--phases` splits the blocks op's time by phase as well (the kernels' variant with phase clocks,
`MSDD_CPU_KERNELS=phases`; `benchmarks/profile_student.py --phases` says what each phase holds): per phase the
student's milliseconds per decode against the teacher's per student-equivalent (its decode's over its passes per
student pass, 60 at 30 steps and cfg 2), so that the ratio's distance from that number shows by phase.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

import msdd.malloc
from msdd.config import load_config
from msdd.eval.bench.contenders import flow_contender
from msdd.eval.bench.models import FlowModel
from msdd.flow.sampler import passes_per_step
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
    parser.add_argument("--phases", action="store_true", help="split the blocks op by phase (its phase clocks)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.phases:
        os.environ[cpu_kernels.ENV] = "phases"  # before the first library() call builds the kernels
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
    phases = dict.fromkeys(cpu_kernels.PHASES, 0.0)  # the decode running's seconds per phase (--phases)
    real = cpu_kernels.blocks

    def timed_blocks(*a):
        if args.phases:
            cpu_kernels.phase_times()  # from here on
        t0 = time.perf_counter()
        out = real(*a)
        inside[0] += time.perf_counter() - t0
        if args.phases:
            for phase, seconds in cpu_kernels.phase_times().items():
                phases[phase] += seconds
        return out

    cpu_kernels.blocks = timed_blocks  # fused_blocks calls it through the module
    times = {"student": ([], []), "teacher": ([], [])}
    by_phase = {"student": [], "teacher": []}  # per decode: {phase: seconds}
    try:
        with torch.inference_mode(), autocast(torch.device("cpu"), bf16):
            student.decode(), teacher.decode()
            for _ in range(args.rounds):
                for name, contender, n in (("student", student, args.student_decodes), ("teacher", teacher, 1)):
                    for _ in range(n):
                        inside[0] = 0.0
                        phases.update(dict.fromkeys(phases, 0.0))
                        t0 = time.perf_counter()
                        contender.decode()
                        times[name][0].append(time.perf_counter() - t0)
                        times[name][1].append(inside[0])
                        by_phase[name].append(dict(phases))
    finally:
        cpu_kernels.blocks = real
    if not times["student"][1][0]:
        raise SystemExit("the blocks op did not run (a decode block by block): no split to report")
    result = {"command": "python " + " ".join(sys.argv), "preset": args.preset, "dtype": args.dtype,
              "rounds": args.rounds, "steps": args.steps, "cfg": args.cfg, "threads": torch.get_num_threads()}
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
    if args.phases:
        passes = args.steps * passes_per_step(args.cfg)  # the teacher's passes per student pass
        result["teacher_passes_per_student_pass"] = passes
        result["phases"] = {}
        print(f"{'phase':10s} {'student ms':>11s} {'teacher ms / ' + str(passes):>16s} {'difference':>11s}")
        for phase in cpu_kernels.PHASES:
            st = statistics.median(d[phase] for d in by_phase["student"])
            te = statistics.median(d[phase] for d in by_phase["teacher"]) / passes
            result["phases"][phase] = {"student_s": st, "teacher_per_student_pass_s": te}
            print(f"{phase:10s} {st * 1e3:11.2f} {te * 1e3:16.2f} {(st - te) * 1e3:+11.2f}")
        for name in ("student", "teacher"):  # the op's time between its phases, and outside the op, per decode
            result[name]["between_phases_s"] = statistics.median(
                b - sum(d.values()) for b, d in zip(times[name][1], by_phase[name]))
        st, te = result["student"], result["teacher"]
        print(f"{'between':10s} {st['between_phases_s'] * 1e3:11.2f} {te['between_phases_s'] / passes * 1e3:16.2f}")
        print(f"{'outside':10s} {st['outside_s'] * 1e3:11.2f} {te['outside_s'] / passes * 1e3:16.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
