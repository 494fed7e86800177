"""One benchmark run: the peaks, the contenders timed and summarised per row (img/s, GFLOP, fraction of
peak, speed against the student), the optional resolution table, and the report with its machine and versions."""

from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import statistics
from typing import Callable, Sequence

import torch

from msdd import malloc
from msdd.eval.bench.contenders import build_contenders, default_ssdd_preset, ssdd_config
from msdd.eval.bench.models import Contender, FlowModel, at_resolution, load_models
from msdd.eval.bench.peak import matmul_peaks, measure_conv_peak, peak_sizes
from msdd.eval.bench.pipeline import GeneratorSettings, decoder_shares, default_gen_preset, pipeline_contender
from msdd.eval.bench.settings import DTYPES, BenchSettings
from msdd.eval.bench.timing import log_stderr, time_contenders


def summarize(c: Contender, seconds: list[float] | None, first_call: float | None, batch_size: int,
              peak_gflops: float, compiled: bool = False, peak_memory_mib: float | None = None,
              round_peaks: list[float] | None = None) -> dict:
    """A contender's row. `round_peaks`: the matmul peak probed after each of its samples (`time_contenders`), for
    `fraction_of_round_peak`, the median over rounds of each sample's GFLOP/s over the probe beside it."""
    if c.error is not None:
        return {"name": c.name, "error": c.error, **c.info}
    median = statistics.median(seconds)
    img_per_s = batch_size / median
    gflop = c.flop_per_image / 1e9
    achieved = gflop * img_per_s
    row = {
        "name": c.name, "img_per_s": img_per_s, "gflop_per_img": gflop, "achieved_gflops": achieved,
        "fraction_of_peak": achieved / peak_gflops, "seconds_median": median, "seconds_min": min(seconds),
        "seconds_max": max(seconds), "seconds": seconds, "first_call_seconds": first_call,
        "peak_memory_mib": peak_memory_mib, **c.info,
    }
    if round_peaks:
        row["round_peaks_gflops"] = round_peaks
        row["fraction_of_round_peak"] = statistics.median(
            gflop * batch_size / s / p for s, p in zip(seconds, round_peaks))
    if compiled:  # the first warm-up call compiled: what it took beyond a normal call
        row["compile_seconds"] = max(0.0, first_call - median)
    return row


def measure(contenders: list[Contender], settings: BenchSettings, peak_gflops: float, device: torch.device,
            log: Callable[[str], None] = log_stderr, probe: Callable[[], float] | None = None) -> list[dict]:
    runnable = {c.name: c.decode for c in contenders if c.decode is not None}
    t = time_contenders(runnable, settings.rounds, settings.warmup, device, settings.dtype == "bf16", log,
                        settings.min_time, probe)
    rows = [summarize(c, t.seconds.get(c.name), t.first.get(c.name), settings.batch_size, peak_gflops,
                      settings.compile, t.memory.get(c.name), t.peaks.get(c.name)) for c in contenders]
    student = next((r for r in rows if r["name"] == "student" and "img_per_s" in r), None)
    for r in rows:
        if student and "img_per_s" in r:
            r["speed_vs_student"] = r["img_per_s"] / student["img_per_s"]
    return rows


def resolution_table(teacher: FlowModel, student: FlowModel, resolutions: Sequence[int], steps: Sequence[int],
                     guidance: float, settings: BenchSettings, peak_gflops: float, device: torch.device,
                     log: Callable[[str], None] = log_stderr) -> list[dict]:
    """Decode cost against resolution: GFLOP per image and measured img/s of the student and the teacher
    at each resolution, with one stage more per doubling (`at_resolution`); timed alternately as above."""
    sampling = dataclasses.replace(teacher.config.sampling, steps=tuple(steps))
    base = dataclasses.replace(teacher.config, sampling=sampling)  # the teacher's --steps, extended per stage
    out = []
    for r in resolutions:
        t_cfg, s_cfg = at_resolution(base, r), at_resolution(student.config, r)
        t_model = teacher.with_config(t_cfg)
        s_model = student.with_config(s_cfg) if student is not teacher else t_model
        log(f"resolution {r}: {t_cfg.flow.num_stages} stages {list(t_cfg.stage_resolutions)}, "
            f"teacher steps {list(t_cfg.sampling.steps)}")
        contenders = build_contenders(("student", "teacher"), t_model, s_model, t_cfg.sampling.steps, guidance,
                                      settings.batch_size, device, settings.compile, weights=_weights(settings))
        student_row, teacher_row = measure(contenders, settings, peak_gflops, device, log)
        out.append({"resolution": r, "num_stages": t_cfg.flow.num_stages,
                    "stage_resolutions": list(t_cfg.stage_resolutions), "student": student_row, "teacher": teacher_row})
    return out


def _sig(obj, digits: int = 6):
    """Round every float in a JSON-able tree to `digits` significant digits."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _sig(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sig(v, digits) for v in obj]
    return obj


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(settings: BenchSettings, log: Callable[[str], None] = log_stderr) -> dict:
    """Run the benchmark described by `settings`; returns the report (what `msdd bench` writes as JSON)."""
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_bench(settings, log)
    finally:
        torch.set_num_threads(previous_threads)


def _weights(settings: BenchSettings) -> torch.dtype | None:
    """bf16 runs keep the weights of every contender's matmuls and convolutions in bf16 (autocast would otherwise cast
    them again on every call, a large share of a paper-256 student decode on the CPU; benchmarks/README.md, "How")."""
    return torch.bfloat16 if settings.dtype == "bf16" else None


def _round_probe(kernel_peaks: dict[str, float], dtype: torch.dtype, device: torch.device,
                 quick: bool) -> Callable[[], float]:
    """The probe taken after every timed sample: the fastest kernel of the first probe alone, best of 3 at the sizes
    of `peak_sizes` (quick: one call at the smaller size), a short call beside each sample. The peak moves within a
    run by as much as a row's distance to it (benchmarks/README.md, "The machine's state, a peak probed beside each
    sample, faster adaLN rows"): `fraction_of_round_peak` sets each sample against the probe beside it,
    `fraction_of_peak` (the headline %) against the highest probe before or after the rounds."""
    kernel = max(kernel_peaks, key=kernel_peaks.get)
    if quick:
        n = _peak_sizes(dtype, device, quick)[0]
        return lambda: matmul_peaks(dtype, None, device, n, repeats=1, only=kernel)[kernel]
    return lambda: matmul_peaks(dtype, None, device, repeats=3, only=kernel)[kernel]


def _peak_sizes(dtype: torch.dtype, device: torch.device, quick: bool) -> tuple[int, ...]:
    """The sizes the run's peak probes time: both of `peak_sizes`; quick: the smaller alone, whose calls take an
    eighth of the larger's (benchmarks/README.md, "How")."""
    return peak_sizes(dtype, device)[:1] if quick else peak_sizes(dtype, device)


def _peaks(dtype: torch.dtype, device: torch.device, quick: bool) -> dict[str, float]:
    """Each matmul kernel's GFLOP/s at its best over `_peak_sizes`, best of 5 calls a size (quick: 3)."""
    if quick:
        return matmul_peaks(dtype, None, device, _peak_sizes(dtype, device, quick)[0], repeats=3)
    return matmul_peaks(dtype, None, device, repeats=5)


def _run_bench(settings: BenchSettings, log: Callable[[str], None]) -> dict:
    device = torch.device(settings.device)
    dtype = DTYPES[settings.dtype]
    teacher, student = load_models(settings, device)
    try:  # the teacher's steps: --steps, else the model's schedule (a one-step student's too)
        asked = teacher.config.sampling.steps if settings.steps is None else settings.steps
        steps = teacher.family.resolve_steps(asked)
    except ValueError as e:
        raise ValueError(f"--steps: {e}") from None
    guidance = teacher.config.sampling.cfg if settings.guidance is None else float(settings.guidance)
    for model in (teacher, student):  # a bad --resolutions fails before anything is timed
        for r in settings.resolutions:
            at_resolution(model.config, r)
    if guidance in (0.0, 1.0) and {"teacher", "teacher-nocfg"} <= set(settings.contenders):
        log(f"note: the teacher's cfg is {guidance:g} (a single pass per step), so `teacher` and `teacher-nocfg` are "
            f"the same decode; pass --cfg 2 to time guided decoding")
    sizes = _peak_sizes(dtype, device, settings.quick)
    kernel_peaks = _peaks(dtype, device, settings.quick)
    peak = max(kernel_peaks.values())
    conv_peak = measure_conv_peak(dtype, None, device, repeats=3 if settings.quick else 5)
    log(f"matmul peak {peak:.1f} GFLOP/s (best of {' and '.join(f'{n}^3' for n in sizes)} "
        f"{settings.dtype}, {torch.get_num_threads()} threads; "
        + ", ".join(f"{k} {v:.1f}" for k, v in kernel_peaks.items()) + "), "
        f"3x3 conv {conv_peak:.1f} GFLOP/s")

    ssdd = None
    if {"ssdd-student", "ssdd-teacher"} & set(settings.contenders):
        ssdd = ssdd_config(settings.ssdd_preset, teacher.config.image_size)
    contenders = build_contenders(settings.contenders, teacher, student, steps, guidance, settings.batch_size,
                                  device, settings.compile, ssdd, settings.ssdd_steps, weights=_weights(settings))
    gen = None
    if settings.pipeline:
        gen = GeneratorSettings.of(settings.gen_preset or default_gen_preset(teacher.config.image_size),
                                   settings.gen_steps, settings.gen_cfg)
        built: dict = {}  # one generator per latent shape
        contenders = [pipeline_contender(c, gen, settings.batch_size, device, _weights(settings), built=built)
                      for c in contenders]
        log(f"each row: {gen.preset} generator, {gen.steps} steps, cfg {gen.guidance:g}, then its decoder")
    log(f"decoding {settings.batch_size} x {teacher.config.image_size} px: {', '.join(c.name for c in contenders)}")
    rows = measure(contenders, settings, peak, device, log, _round_probe(kernel_peaks, dtype, device, settings.quick))
    # the probe again after the timed rounds: the peak moves between spells (benchmarks/README.md, "How"), and a probe
    # taken in a slow one alone would put every row closer to the peak than it is; the % uses the higher of the two
    end_peaks = _peaks(dtype, device, settings.quick)
    start_peak, end_peak = peak, max(end_peaks.values())
    peak = max(start_peak, end_peak)
    kernel_peaks = {k: max(v, end_peaks[k]) for k, v in kernel_peaks.items()}
    for r in rows:
        if "achieved_gflops" in r:
            r["fraction_of_peak"] = r["achieved_gflops"] / peak
    log(f"matmul peak after the rounds {end_peak:.1f} GFLOP/s (before {start_peak:.1f}): the % uses {peak:.1f}")
    if gen is not None:
        rows = [decoder_shares(r, settings.rounds) for r in rows]
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    report = {
        "command": settings.command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": None if settings.model else settings.preset, "overrides": list(settings.overrides),
        "model": settings.model, "student": settings.student,
        "resolution": teacher.config.image_size, "num_stages": teacher.config.flow.num_stages,
        "teacher_steps": list(steps), "teacher_cfg": guidance,
        "ssdd_preset": (settings.ssdd_preset or default_ssdd_preset(teacher.config.image_size)) if ssdd else None,
        "batch_size": settings.batch_size, "dtype": settings.dtype,
        "bf16": ("weights of linear/conv layers stored in bf16, calls under bf16 autocast"
                 if settings.dtype == "bf16" else None),
        "compile": settings.compile, "threads": torch.get_num_threads(),
        "device": str(device), "machine": _machine(device), "machine_peak_gflops": peak,
        "machine_peak_gflops_before": start_peak, "machine_peak_gflops_after": end_peak,
        "peak_matmul_sizes": list(peak_sizes(dtype, device)),
        "matmul_peak_by_kernel": kernel_peaks,
        "conv_peak_gflops": conv_peak,
        "warmup": settings.warmup, "rounds": settings.rounds, "min_time": settings.min_time,
        "malloc": malloc.settings(),
        "torch_version": torch.__version__, "diffusers_version": diffusers_version,
        "python_version": platform.python_version(),
        "pipeline": dataclasses.asdict(gen) | ({"guidance_note": f"--gen-cfg {settings.gen_cfg:g} does not apply: "
                                                "the generator is unconditional"}
                                               if gen.guidance != settings.gen_cfg else {}) if gen else None,
        "contenders": rows,
    }
    if settings.resolutions:
        report["resolution_table"] = resolution_table(teacher, student, settings.resolutions, steps, guidance,
                                                      settings, peak, device, log)
    return _sig(report)
