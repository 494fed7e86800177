"""The settings of one `msdd bench` run (`BenchSettings`, one field per CLI option), the contender names
and what `--quick` sets."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

CONTENDERS = ("student", "student-eager", "student-bf16", "teacher", "teacher-nocfg", "single-scale", "sd-vae",
              "ssdd-student", "ssdd-teacher", "encoder", "student+encoder")
# named in --contenders only: onnxruntime is an optional extra; int8 matmuls run on CPUs only
OPTIONAL_CONTENDERS = ("onnx-student", "student-int8")
# --pipeline: the rows timed after a latent generator (default), and every row that can be (a PyTorch decode
# of given latents in the run's dtype)
PIPELINE_ROWS = ("student", "teacher", "ssdd-student", "sd-vae")
PIPELINE_CAPABLE = ("student", "teacher", "teacher-nocfg", "single-scale", "sd-vae", "ssdd-student", "ssdd-teacher")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What `--quick` sets where the option is not given: a smoke run that takes seconds on a CPU.
QUICK = {"preset": "tiny-64", "batch_size": 2, "warmup": 1, "rounds": 2, "steps": 2, "min_time": 0.0}


def parse_list(text: str | None, option: str, kind: type = str) -> tuple | None:
    """'a,b,c' -> ('a', 'b', 'c') (or ints), with an error naming the option."""
    if text is None:
        return None
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected a comma list of {kind.__name__}s") from None
    if not values:
        raise ValueError(f"{option} {text!r}: expected at least one value")
    return values


@dataclass(frozen=True)
class BenchSettings:
    """One `msdd bench` run; each field is the CLI option of the same name (`guidance`: `--cfg`).

    steps: the teacher's Euler steps per stage (an int for every stage, a tuple with one entry per stage,
    or None for the model's own schedule); guidance (`--cfg`): the teacher's guidance scale (None: the model's).
    model / student: trained model directories (default: random weights of `preset` + `overrides`).
    """

    preset: str = "tiny-64"
    overrides: tuple[str, ...] = ()
    model: str | None = None
    student: str | None = None
    dtype: str = "fp32"
    compile: bool = False
    batch_size: int = 4
    resolution: int | None = None
    steps: int | tuple[int, ...] | None = None
    guidance: float | None = None  # --cfg
    rounds: int = 5
    warmup: int = 2
    min_time: float = 1.0  # seconds of a timed sample (calls repeated back to back); not with --pipeline
    threads: int | None = None
    contenders: tuple[str, ...] = CONTENDERS
    resolutions: tuple[int, ...] = ()
    device: str = "cpu"
    quick: bool = False  # recorded in the command; also the peak probes at the smaller size, fewer repeats
    ssdd_preset: str | None = None  # None: default_ssdd_preset(resolution)
    ssdd_steps: int | None = None  # None: the SSDD preset's own steps
    pipeline: bool = False  # generator + decoder per row (msdd.eval.bench.pipeline)
    gen_preset: str | None = None  # None: gen-xl from 256 px, else gen-tiny
    gen_steps: int = 50
    gen_cfg: float = 1.5

    def _check_presets(self, check) -> None:
        """--ssdd-preset and --gen-preset name presets that exist (or YAML files), before any timing."""
        from msdd.config import load_config, preset_names
        from msdd.families import family_of
        from msdd.families.ssdd import SSDDFamily
        from msdd.generator.config import PRESETS

        if self.ssdd_preset is not None and not Path(self.ssdd_preset).is_file():
            ssdd = [n for n in preset_names() if n.startswith("ssdd")]
            check(self.ssdd_preset in ssdd, "--ssdd-preset", f"unknown SSDD preset {self.ssdd_preset!r}; choose from "
                                                             f"{ssdd} or give a YAML file")
        if not self.model:  # the student and teacher rows time the preset's own decoder: a multi-scale one
            config = load_config(self.preset, list(self.overrides)).model
            check(family_of(config).multi_scale, "--preset",
                  f"{self.preset!r} is a {config.family!r} model; the student and teacher rows time a multi-scale "
                  "(msdd) decoder: pass an msdd preset (the ssdd-* rows time SSDD, with --ssdd-preset)")
        if self.ssdd_preset is not None and Path(self.ssdd_preset).is_file():
            family = family_of(load_config(self.ssdd_preset).model)
            check(isinstance(family, SSDDFamily), "--ssdd-preset",
                  f"{self.ssdd_preset} is a {family.name!r} model, not an SSDD one")
        if self.gen_preset is not None:
            check(self.gen_preset in PRESETS, "--gen-preset", f"unknown generator preset {self.gen_preset!r}; choose "
                                                              f"from {list(PRESETS)}")

    def __post_init__(self) -> None:
        def check(cond: bool, option: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{option}: {msg}")

        check(self.dtype in DTYPES, "--dtype", f"got {self.dtype!r}, expected one of {list(DTYPES)}")
        check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        check(self.rounds >= 1, "--rounds", f"must be >= 1, got {self.rounds}")
        check(self.warmup >= 0, "--warmup", f"must be >= 0, got {self.warmup}")
        check(0 <= self.min_time < math.inf, "--min-time", f"must be a number of seconds >= 0, got {self.min_time}")
        check(self.threads is None or self.threads >= 1, "--threads", f"must be >= 1, got {self.threads}")
        check(self.resolution is None or self.resolution >= 1, "--resolution", f"must be >= 1, got {self.resolution}")
        check(all(r >= 1 for r in self.resolutions), "--resolutions", f"must be >= 1, got {list(self.resolutions)}")
        check(self.guidance is None or 0 <= self.guidance < math.inf, "--cfg", f"must be a number >= 0, got "
                                                                               f"{self.guidance}")
        check(self.ssdd_steps is None or self.ssdd_steps >= 1, "--ssdd-steps", f"must be >= 1, got {self.ssdd_steps}")
        steps = (self.steps,) if isinstance(self.steps, int) else (self.steps or ())
        check(all(n >= 1 for n in steps), "--steps", f"every stage needs >= 1 step, got {self.steps}")
        check(self.gen_steps >= 1, "--gen-steps", f"must be >= 1, got {self.gen_steps}")
        check(0 <= self.gen_cfg < math.inf, "--gen-cfg", f"must be a number >= 0, got {self.gen_cfg}")
        self._check_presets(check)
        if self.pipeline:
            if self.contenders == CONTENDERS:
                object.__setattr__(self, "contenders", PIPELINE_ROWS)
            bad = [c for c in self.contenders if c not in PIPELINE_CAPABLE]
            check(not bad, "--contenders", f"{bad} cannot follow a generator in --pipeline; choose from "
                                           f"{list(PIPELINE_CAPABLE)} (default {','.join(PIPELINE_ROWS)})")
            check(not self.resolutions, "--resolutions", "is not available with --pipeline")
            check(self.min_time == 0 or self.min_time == BenchSettings.min_time, "--min-time",
                  "is not available with --pipeline (a row's sample is one call: it times the generator too)")
            object.__setattr__(self, "min_time", 0.0)
        unknown = [c for c in self.contenders if c not in CONTENDERS + OPTIONAL_CONTENDERS]
        check(not unknown and len(self.contenders) > 0, "--contenders",
              f"got {list(self.contenders)}, expected a comma list of {list(CONTENDERS + OPTIONAL_CONTENDERS)}")
        repeated = sorted({c for c in self.contenders if self.contenders.count(c) > 1})
        check(not repeated, "--contenders", f"{repeated} named more than once; name each row once")
        check(not (self.model and self.overrides), "--set", "changes a preset's random-weight models; a --model is "
                                                            "timed as it was trained (drop --set)")
        on_cpu = [c for c in ("student-int8", "onnx-student") if c in self.contenders]
        check(not on_cpu or torch.device(self.device).type == "cpu", "--contenders",
              f"{on_cpu} run on the CPU only (this run: --device {self.device}); drop them or bench with --device cpu")
        if "onnx-student" in self.contenders:  # before any model is built or timed
            from msdd.integrations.onnx import require_onnx

            try:
                require_onnx("onnx", "onnxruntime")
            except ImportError as e:
                check(False, "--contenders onnx-student", str(e))

    def command(self) -> str:
        """The `msdd bench` command line that repeats this run (what `--quick` set spelled out)."""
        a = ["msdd", "bench"]
        if self.model:
            a += ["--model", self.model]
        else:
            a += ["--preset", self.preset] + [x for o in self.overrides for x in ("--set", o)]
        if self.student:
            a += ["--student", self.student]
        if self.resolution:
            a += ["--resolution", str(self.resolution)]
        if self.steps is not None:
            a += ["--steps", ",".join(map(str, (self.steps,) if isinstance(self.steps, int) else self.steps))]
        if self.guidance is not None:
            a += ["--cfg", f"{self.guidance:g}"]
        a += ["--dtype", self.dtype, "--batch-size", str(self.batch_size), "--warmup", str(self.warmup),
              "--rounds", str(self.rounds), "--min-time", f"{self.min_time:g}"]
        if self.threads:
            a += ["--threads", str(self.threads)]
        if self.contenders != CONTENDERS:
            a += ["--contenders", ",".join(self.contenders)]
        if self.resolutions:
            a += ["--resolutions", ",".join(map(str, self.resolutions))]
        if self.ssdd_preset:
            a += ["--ssdd-preset", self.ssdd_preset]
        if self.ssdd_steps:
            a += ["--ssdd-steps", str(self.ssdd_steps)]
        if self.pipeline:
            a += ["--pipeline", "--gen-steps", str(self.gen_steps), "--gen-cfg", f"{self.gen_cfg:g}"]
            a += ["--gen-preset", self.gen_preset] if self.gen_preset else []
        if self.compile:
            a += ["--compile"]
        a += ["--device", self.device]
        if self.quick:
            a += ["--quick"]
        return shlex.join(a)
