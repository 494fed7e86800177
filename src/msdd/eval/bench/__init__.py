"""Decode throughput (SPEC 8, 11): contenders decode the same fixed latent batch, timed side by side in
one process.

    student          one Euler step per stage, cfg 1 (S decoder passes per image for S stages)
    student-eager    the same decode on the reference path (unfused ops, no cached modulation), uncompiled
    student-bf16     the student again in bf16 (the bf16 / fp32 ratio in one run)
    teacher          N_s steps per stage at the model's guidance (a guided step is one doubled batch;
                     cfg 1 runs one pass per step)
    teacher-nocfg    the same steps, cfg 1
    single-scale     the same decoder with one stage at full resolution, the teacher's total number of
                     steps and its cfg (the paper's single-scale ablation)
    sd-vae           the Stable Diffusion v1 VAE decoder (diffusers `AutoencoderKL`), random weights
    ssdd-student     an SSDD decoder (SPEC 10; `--ssdd-preset`, random weights, at the same resolution),
                     one Euler step
    ssdd-teacher     the same decoder with its own N-step schedule (`--ssdd-steps`)
    encoder, student+encoder
                     the encoder alone, and encode + student decode (the paper's reference times both)
    onnx-student, student-int8
                     named in --contenders only: the student under onnxruntime (fp32), and with int8 matmuls
                     (CPU)

(`settings.CONTENDERS` and `OPTIONAL_CONTENDERS` hold the names.)

All run at one resolution, batch size, dtype and thread count. Method: `torch.inference_mode()`,
warm-up rounds, then R rounds in which every contender runs one sample (its calls back to back for at
least `--min-time` seconds, default 1), in an order rotated by one place per round, so that slow drift of
a shared machine hits every contender alike; per contender the median (and min, max) seconds per batch,
the device synchronised before and after each call. Only
the decode is timed: models, latents and noise generators are made beforehand and the sampler's
generator is re-seeded at the start of every call (every call decodes the same images).

FLOPs are counted with `msdd.eval.flops` (attention included) on shape-only `meta` copies of the
models, so counting costs no compute, and are set against the machine's own matmul peak for the dtype
(`fraction_of_peak`). A 3x3 convolution probe is reported beside it: on CPUs where convolutions run on
faster kernels (oneDNN) than matmuls (BLAS), the convolutional SD-VAE can pass the matmul "peak".

Layout: `settings.py` (the options of a run), `models.py` (the decoders under test), `contenders.py` and
`sdvae.py` (what is timed), `timing.py` (rotated rounds), `memory.py` (peak memory per call), `peak.py` (the
machine's peaks), `pipeline.py` (`--pipeline`: a latent generator before each decoder), `run.py` (one run, its
report) and `report.py` (the stdout tables).
"""

from msdd.eval.bench.models import at_resolution
from msdd.eval.bench.peak import measure_conv_peak, measure_matmul_peak
from msdd.eval.bench.report import format_report
from msdd.eval.bench.run import run_bench
from msdd.eval.bench.sdvae import NO_DIFFUSERS
from msdd.eval.bench.settings import CONTENDERS, QUICK, BenchSettings, parse_list
from msdd.eval.bench.timing import rotated_orders

__all__ = ["CONTENDERS", "NO_DIFFUSERS", "QUICK", "BenchSettings", "at_resolution", "format_report",
           "measure_conv_peak", "measure_matmul_peak", "parse_list", "rotated_orders", "run_bench"]
