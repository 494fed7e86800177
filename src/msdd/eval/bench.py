"""Decode throughput (SPEC 8, 11): contenders decode the same fixed latent batch, timed side by side in
one process.

    student        one Euler step per stage, cfg 1 (S decoder passes per image for S stages)
    teacher        N_s steps per stage with classifier-free guidance (each step is one doubled batch)
    teacher-nocfg  the same steps, cfg 1
    single-scale   the same decoder with one stage at full resolution, the teacher's total number of
                   steps and its cfg (the paper's single-scale ablation)
    sd-vae         the Stable Diffusion v1 VAE decoder (diffusers `AutoencoderKL`), random weights
    ssdd-student   an SSDD decoder (SPEC 10; `--ssdd-preset`, random weights, at the same resolution),
                   one Euler step
    ssdd-teacher   the same decoder with its own N-step schedule (`--ssdd-steps`)

All run at one resolution, batch size, dtype and thread count. Method: `torch.inference_mode()`,
warm-up rounds, then R rounds in which every contender runs once, in an order rotated by one place
per round, so that slow drift of a shared machine hits every contender alike; per contender the
median (and min, max) seconds per batch, the device synchronised before and after each call. Only
the decode is timed: models, latents and noise generators are made beforehand and the sampler's
generator is re-seeded at the start of every call (every call decodes the same images).

FLOPs are counted with `msdd.eval.flops` (attention included) on shape-only `meta` copies of the
models, so counting costs no compute, and are set against the machine's own matmul peak for the dtype
(`fraction_of_peak`). A 3x3 convolution probe is reported beside it: on CPUs where convolutions run on
faster kernels (oneDNN) than matmuls (BLAS), the convolutional SD-VAE can pass the matmul "peak".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msdd.config import ModelConfig, load_config
from msdd.eval.flops import count_flops, decode_flops
from msdd.flow.sampler import sample
from msdd.flow.schedule import stage_windows
from msdd.flow.ssdd import sample_ssdd
from msdd.models.decoder import Decoder
from msdd.models.ssdd import SSDDDecoder
from msdd.tokenizer import Tokenizer, autocast

CONTENDERS = ("student", "student-bf16", "teacher", "teacher-nocfg", "single-scale", "sd-vae", "ssdd-student",
              "ssdd-teacher")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_DIFFUSERS = "diffusers not installed: pip install 'msdd[bench]'"
# What `--quick` sets where the option is not given: a smoke run that takes seconds on a CPU.
QUICK = {"preset": "tiny-64", "batch_size": 2, "warmup": 1, "rounds": 2, "steps": 2}
# Stable Diffusion v1 VAE (the f8c4 `AutoencoderKL`); sample_size is set to the benchmark resolution.
SD_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# settings


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
    """One `msdd bench` run; each field is the CLI option of the same name.

    steps: the teacher's Euler steps per stage (an int for every stage, a tuple with one entry per stage,
    or None for the model's own schedule); cfg: the teacher's guidance scale (None: the model's).
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
    cfg: float | None = None
    rounds: int = 5
    warmup: int = 2
    threads: int | None = None
    contenders: tuple[str, ...] = CONTENDERS
    resolutions: tuple[int, ...] = ()
    device: str = "cpu"
    quick: bool = False  # recorded in the command; also fewer repeats of the peak probes
    ssdd_preset: str | None = None  # None: default_ssdd_preset(resolution)
    ssdd_steps: int | None = None  # None: the SSDD preset's own steps

    def __post_init__(self) -> None:
        def check(cond: bool, option: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{option}: {msg}")

        check(self.dtype in DTYPES, "--dtype", f"got {self.dtype!r}, expected one of {list(DTYPES)}")
        check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        check(self.rounds >= 1, "--rounds", f"must be >= 1, got {self.rounds}")
        check(self.warmup >= 0, "--warmup", f"must be >= 0, got {self.warmup}")
        check(self.threads is None or self.threads >= 1, "--threads", f"must be >= 1, got {self.threads}")
        check(self.resolution is None or self.resolution >= 1, "--resolution", f"must be >= 1, got {self.resolution}")
        check(all(r >= 1 for r in self.resolutions), "--resolutions", f"must be >= 1, got {list(self.resolutions)}")
        check(self.cfg is None or self.cfg >= 0, "--cfg", f"must be >= 0, got {self.cfg}")
        check(self.ssdd_steps is None or self.ssdd_steps >= 1, "--ssdd-steps", f"must be >= 1, got {self.ssdd_steps}")
        steps = (self.steps,) if isinstance(self.steps, int) else (self.steps or ())
        check(all(n >= 1 for n in steps), "--steps", f"every stage needs >= 1 step, got {self.steps}")
        unknown = [c for c in self.contenders if c not in CONTENDERS]
        check(not unknown and len(self.contenders) > 0, "--contenders",
              f"got {list(self.contenders)}, expected a comma list of {list(CONTENDERS)}")

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
        if self.cfg is not None:
            a += ["--cfg", f"{self.cfg:g}"]
        a += ["--dtype", self.dtype, "--batch-size", str(self.batch_size), "--warmup", str(self.warmup),
              "--rounds", str(self.rounds)]
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
        if self.compile:
            a += ["--compile"]
        a += ["--device", self.device]
        if self.quick:
            a += ["--quick"]
        return shlex.join(a)


# ---------------------------------------------------------------------------------------------
# models: a decoder and the config it decodes with (encoders are never built)


@dataclass(frozen=True)
class FlowModel:
    config: ModelConfig
    decoder: nn.Module

    @classmethod
    def random(cls, config: ModelConfig, device: torch.device) -> "FlowModel":
        with torch.device(device):
            decoder = Decoder(config.decoder, config.image_size, config.latent_tokens, config.latent_dim)
        return cls(config, decoder.eval())

    @classmethod
    def load(cls, path: str, device: torch.device) -> "FlowModel":
        tok = Tokenizer.from_pretrained(path, device=device)
        if tok.config.family != "msdd":
            raise ValueError(f"{path} is a {tok.config.family!r} model; --model / --student take multi-scale (msdd) "
                             f"models (the ssdd-* rows are built from --ssdd-preset)")
        return cls(tok.config, tok.decoder)

    def with_config(self, config: ModelConfig) -> "FlowModel":
        """The same weights (shared, not copied) under another config of the same architecture; the
        decoder does not depend on the number of stages, only on the resolution (RoPE grid)."""
        config.validate()
        if config.image_size == self.config.image_size:
            return FlowModel(config, self.decoder)
        with torch.device("meta"):
            decoder = Decoder(config.decoder, config.image_size, config.latent_tokens, config.latent_dim)
        decoder.load_state_dict(self.decoder.state_dict(), assign=True)
        return FlowModel(config, decoder.eval())


def at_resolution(config: ModelConfig, resolution: int) -> ModelConfig:
    """`config` at `resolution` with one stage more per doubling (one fewer per halving), so that the first
    stage keeps its resolution, as the paper does for 512 px; the steps list is extended with its last
    value (or cut from the end)."""
    ratio = resolution / config.image_size
    k = round(math.log2(ratio))
    if 2.0**k != ratio:
        raise ValueError(f"--resolutions: {resolution} is not {config.image_size} px times a power of two")
    stages = config.flow.num_stages + k
    if stages < 1:
        raise ValueError(f"--resolutions: {resolution} px would leave {stages} stages for this "
                         f"{config.flow.num_stages}-stage {config.image_size} px model")
    steps = (tuple(config.sampling.steps) + (config.sampling.steps[-1],) * max(0, k))[:stages]
    new = dataclasses.replace(config, image_size=resolution,
                              flow=dataclasses.replace(config.flow, num_stages=stages),
                              sampling=dataclasses.replace(config.sampling, steps=steps))
    new.validate()
    return new


def single_scale_config(config: ModelConfig, total_steps: int, cfg: float) -> ModelConfig:
    """The same architecture with one stage at full resolution and `total_steps` Euler steps."""
    new = dataclasses.replace(config, flow=dataclasses.replace(config.flow, num_stages=1),
                              sampling=dataclasses.replace(config.sampling, steps=(total_steps,), cfg=cfg))
    new.validate()
    return new


def load_models(s: BenchSettings, device: torch.device) -> tuple[FlowModel, FlowModel]:
    """(teacher, student): --model (or random weights of the preset) and --student (or the same model)."""
    if s.model:
        teacher = FlowModel.load(s.model, device)
    else:
        teacher = FlowModel.random(load_config(s.preset, list(s.overrides)).model, device)
    student = FlowModel.load(s.student, device) if s.student else teacher
    if student.config.image_size != teacher.config.image_size:
        raise ValueError(f"--student is a {student.config.image_size} px model but the teacher is "
                         f"{teacher.config.image_size} px; both must decode the same resolution")
    if s.resolution and s.resolution != teacher.config.image_size:
        teacher = teacher.with_config(dataclasses.replace(teacher.config, image_size=s.resolution))
        if s.student:
            student = student.with_config(dataclasses.replace(student.config, image_size=s.resolution))
        else:
            student = teacher
    return teacher, student


def resolve_steps(steps: int | Sequence[int] | None, config: ModelConfig) -> tuple[int, ...]:
    n = config.flow.num_stages
    if steps is None:
        return tuple(config.sampling.steps)
    steps = (int(steps),) * n if isinstance(steps, int) else tuple(int(v) for v in steps)
    if len(steps) != n:
        raise ValueError(f"--steps needs one int or {n} comma-separated ints (one per stage), got {list(steps)}")
    return steps


# ---------------------------------------------------------------------------------------------
# contenders


@dataclass
class Contender:
    name: str
    decode: Callable[[], object] | None  # decodes the fixed batch once; None when unavailable
    flop_per_image: int | None = None
    info: dict = field(default_factory=dict)  # steps, cfg, passes per image...: copied into the report
    error: str | None = None


def _latents(config: ModelConfig, batch_size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, config.latent_tokens, config.latent_dim, generator=g).to(device)  # (B, L, C)


def flow_contender(name: str, model: FlowModel, decoder: nn.Module, z: torch.Tensor, steps: Sequence[int],
                   cfg: float, seed: int = 0) -> Contender:
    """Decoding latents z (B, L, C) with `sample` at `steps` per stage and guidance `cfg`. `decoder` is
    `model.decoder` or its compiled wrapper."""
    c = model.config
    windows = stage_windows(c.flow.num_stages, c.image_size, c.flow.gamma)
    steps = tuple(int(n) for n in steps)
    generator = torch.Generator(device=z.device)

    def decode():
        generator.manual_seed(seed)
        return sample(decoder, z, windows, steps, cfg=cfg, gamma=c.flow.gamma, generator=generator)

    with torch.device("meta"):  # shapes only
        shape_only = Tokenizer(dataclasses.replace(c, sampling=dataclasses.replace(c.sampling, steps=steps)))
    passes = sum(steps) * (1 if cfg in (0.0, 1.0) else 2)
    info = {"steps": list(steps), "cfg": cfg, "num_stages": c.flow.num_stages, "passes_per_image": passes,
            "params_M": sum(p.numel() for p in model.decoder.parameters()) / 1e6}
    return Contender(name, decode, decode_flops(shape_only, steps, cfg), info)


def sd_vae_contender(resolution: int, batch_size: int, device: torch.device, compile: bool = False,
                     weights: torch.dtype | None = None) -> Contender:
    """The SD v1 VAE decoder (random weights) decoding latents (B, 4, R/8, R/8) with `.decode(z).sample`."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return Contender("sd-vae", None, error=NO_DIFFUSERS)
    if resolution % 8:
        return Contender("sd-vae", None, error=f"resolution {resolution} is not a multiple of 8")
    h = resolution // 8
    with torch.device(device):
        vae = cast_weights(AutoencoderKL(**SD_VAE_CONFIG, sample_size=resolution).eval(), weights)
    if compile:
        vae.decoder = torch.compile(vae.decoder)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch_size, 4, h, h, generator=g).to(device)  # (B, 4, R/8, R/8)

    def decode():
        return vae.decode(z).sample

    with torch.device("meta"):  # shapes only
        shape_only = AutoencoderKL(**SD_VAE_CONFIG, sample_size=resolution)
    flops = count_flops(lambda x: shape_only.decode(x).sample, torch.zeros(1, 4, h, h, device="meta"))
    params = sum(p.numel() for m in (shape_only.post_quant_conv, shape_only.decoder) for p in m.parameters())
    return Contender("sd-vae", decode, flops, {"latent": [4, h, h], "passes_per_image": 1, "params_M": params / 1e6})


def default_ssdd_preset(resolution: int) -> str:
    return "ssdd-m-256" if resolution >= 256 else "ssdd-tiny-64"


def ssdd_config(preset: str | None, resolution: int) -> ModelConfig:
    """The model section of an SSDD preset (default: `default_ssdd_preset`) at `resolution` px (the U-Net is
    convolutional and its RoPE grid follows the resolution; the token map, if any, is resized with it)."""
    config = load_config(preset or default_ssdd_preset(resolution)).model
    if config.family != "ssdd":
        raise ValueError(f"--ssdd-preset {preset!r} is a {config.family!r} model, not an SSDD one")
    config = dataclasses.replace(config, image_size=resolution)
    config.validate()
    return config


def ssdd_contender(name: str, config: ModelConfig, steps: int, batch_size: int, device: torch.device,
                   compile: bool = False, seed: int = 0, weights: torch.dtype | None = None) -> Contender:
    """An SSDD decoder (random weights) decoding a fixed latent batch with `steps` Euler steps."""
    with torch.device(device):
        decoder = cast_weights(SSDDDecoder(config).eval(), weights)
    run = torch.compile(decoder) if compile else decoder
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch_size, *config.latent_shape, generator=g).to(device)  # (B, L, C) or (B, c, R/8, R/8)
    generator = torch.Generator(device=device)
    shift = config.ssdd.shift

    def decode():
        generator.manual_seed(seed)
        return sample_ssdd(run, z, steps, shift, generator=generator)

    with torch.device("meta"):  # shapes only
        shape_only = SSDDDecoder(config)
    r = config.image_size
    pass_flops = count_flops(shape_only, torch.zeros(1, 3, r, r, device="meta"), torch.zeros(1, device="meta"),
                             torch.zeros(1, *config.latent_shape, device="meta"))
    info = {"steps": [steps], "cfg": 1.0, "passes_per_image": steps, "family": "ssdd",
            "latent": list(config.latent_shape), "params_M": sum(p.numel() for p in decoder.parameters()) / 1e6}
    return Contender(name, decode, steps * pass_flops, info)


def cast_weights(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Store the weights of the linear and convolution layers of `module` in `dtype`, in place (bf16
    inference: autocast then has no weight to cast on every call; norms and buffers stay fp32)."""
    if dtype is not None:
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                m.to(dtype)
    return module


def _in_bf16(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()

    return run


def build_contenders(names: Sequence[str], teacher: FlowModel, student: FlowModel, steps: Sequence[int],
                     cfg: float, batch_size: int, device: torch.device, compile: bool = False,
                     ssdd: ModelConfig | None = None, ssdd_steps: int | None = None,
                     weights: torch.dtype | None = None) -> list[Contender]:
    """The named contenders. `weights` (bf16 runs) stores every decoder's linear/conv weights in that type."""
    compiled: dict[int, nn.Module] = {}  # one torch.compile wrapper per decoder module, shared by contenders
    for model in (teacher, student):
        cast_weights(model.decoder, weights)

    def dec(model: FlowModel) -> nn.Module:
        if not compile:
            return model.decoder
        if id(model.decoder) not in compiled:
            compiled[id(model.decoder)] = torch.compile(model.decoder)
        return compiled[id(model.decoder)]

    z = _latents(teacher.config, batch_size, device)
    out = []
    for name in names:
        if name == "student":
            one_step = (1,) * student.config.flow.num_stages
            out.append(flow_contender(name, student, dec(student), _latents(student.config, batch_size, device),
                                      one_step, 1.0))
        elif name == "student-bf16":  # the student again in bf16: the bf16/fp32 ratio in one run
            one_step = (1,) * student.config.flow.num_stages
            half = FlowModel(student.config, cast_weights(copy.deepcopy(student.decoder), torch.bfloat16))
            c = flow_contender(name, half, dec(half), _latents(student.config, batch_size, device), one_step, 1.0)
            out.append(dataclasses.replace(c, decode=_in_bf16(c.decode, device), info={**c.info, "dtype": "bf16"}))
        elif name == "teacher":
            out.append(flow_contender(name, teacher, dec(teacher), z, steps, cfg))
        elif name == "teacher-nocfg":
            out.append(flow_contender(name, teacher, dec(teacher), z, steps, 1.0))
        elif name == "single-scale":
            single = teacher.with_config(single_scale_config(teacher.config, sum(steps), cfg))
            out.append(flow_contender(name, single, dec(teacher), z, (sum(steps),), cfg))
        elif name == "sd-vae":
            out.append(sd_vae_contender(teacher.config.image_size, batch_size, device, compile, weights))
        elif name in ("ssdd-student", "ssdd-teacher"):
            ssdd = ssdd or ssdd_config(None, teacher.config.image_size)
            n = 1 if name == "ssdd-student" else (ssdd_steps or ssdd.ssdd.steps)
            out.append(ssdd_contender(name, ssdd, n, batch_size, device, compile, weights=weights))
        else:
            raise ValueError(f"unknown contender {name!r}; expected one of {list(CONTENDERS)}")
    return out


# ---------------------------------------------------------------------------------------------
# timing


def rotated_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The run order of each round: round r starts r places further along, so over len(names) rounds
    every contender runs once in every position."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)]


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_contenders(decoders: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device,
                    bf16: bool = False, log: Callable[[str], None] = _stderr
                    ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of every contender: `warmup` untimed rounds, then `rounds` timed rounds in rotated
    order. Returns (seconds of each timed round per contender, seconds of each contender's first call)."""
    sync = _synchronizer(device)

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    names = list(decoders)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, float] = {}
    with torch.inference_mode(), autocast(device, bf16):
        for i, order in enumerate(rotated_orders(names, warmup)):
            for name in order:
                t = timed(decoders[name])
                first.setdefault(name, t)
            log(f"  warm-up {i + 1}/{warmup} done")
        for i, order in enumerate(rotated_orders(names, rounds)):
            for name in order:
                t = timed(decoders[name])
                first.setdefault(name, t)
                seconds[name].append(t)
            log(f"  round {i + 1}/{rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.3f}s" for n in order))
    return seconds, first


def _peak_size(dtype: torch.dtype, device: torch.device) -> int:
    n = 2048 if dtype == torch.float32 else 4096
    return n * 2 if device.type == "cuda" else n


@contextlib.contextmanager
def _num_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _best_gflops(fn: Callable[[], object], flops: int, device: torch.device, repeats: int) -> float:
    """GFLOP/s of the fastest of `repeats` timed calls of `fn` (after one untimed)."""
    sync = _synchronizer(device)
    best = math.inf
    with torch.inference_mode():
        fn()
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def measure_matmul_peak(dtype: torch.dtype = torch.float32, threads: int | None = None,
                        device: torch.device | str = "cpu", n: int | None = None, repeats: int = 5) -> float:
    """The machine's matmul peak in GFLOP/s for `dtype`: the best of `repeats` n x n @ n x n products
    (2 n^3 FLOPs each); n defaults to 2048 (fp32) / 4096 (bf16) on CPU, twice that on CUDA."""
    device = torch.device(device)
    n = n or _peak_size(dtype, device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    with _num_threads(threads):
        return _best_gflops(lambda: torch.mm(a, b), 2 * n**3, device, repeats)


def measure_conv_peak(dtype: torch.dtype = torch.float32, threads: int | None = None,
                      device: torch.device | str = "cpu", channels: int = 512, size: int = 32,
                      repeats: int = 5) -> float:
    """GFLOP/s of a 3x3 convolution, channels -> channels on size x size (the SD-VAE decoder's main op).
    Reported beside the matmul peak: on some CPUs convolutions run on faster kernels (oneDNN) than
    matmuls (BLAS), so a convolutional decoder can exceed the "matmul peak"."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, size, size, generator=g).to(device, dtype)  # (1, C, H, W)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device, dtype)
    with _num_threads(threads):
        return _best_gflops(lambda: F.conv2d(x, w, padding=1), 2 * size * size * channels * channels * 9,
                            device, repeats)


# ---------------------------------------------------------------------------------------------
# measuring and reporting


def summarize(c: Contender, seconds: list[float] | None, first_call: float | None, batch_size: int,
              peak_gflops: float, compiled: bool = False) -> dict:
    if c.error is not None:
        return {"name": c.name, "error": c.error, **c.info}
    median = statistics.median(seconds)
    img_per_s = batch_size / median
    gflop = c.flop_per_image / 1e9
    achieved = gflop * img_per_s
    row = {
        "name": c.name, "img_per_s": img_per_s, "gflop_per_img": gflop, "achieved_gflops": achieved,
        "fraction_of_peak": achieved / peak_gflops, "seconds_median": median, "seconds_min": min(seconds),
        "seconds_max": max(seconds), "seconds": seconds, "first_call_seconds": first_call, **c.info,
    }
    if compiled:  # the first warm-up call compiled: what it took beyond a normal call
        row["compile_seconds"] = max(0.0, first_call - median)
    return row


def measure(contenders: list[Contender], s: BenchSettings, peak_gflops: float, device: torch.device,
            log: Callable[[str], None] = _stderr) -> list[dict]:
    runnable = {c.name: c.decode for c in contenders if c.decode is not None}
    seconds, first = time_contenders(runnable, s.rounds, s.warmup, device, s.dtype == "bf16", log)
    rows = [summarize(c, seconds.get(c.name), first.get(c.name), s.batch_size, peak_gflops, s.compile)
            for c in contenders]
    student = next((r for r in rows if r["name"] == "student" and "img_per_s" in r), None)
    for r in rows:
        if student and "img_per_s" in r:
            r["speed_vs_student"] = r["img_per_s"] / student["img_per_s"]
    return rows


def resolution_table(teacher: FlowModel, student: FlowModel, resolutions: Sequence[int], steps: Sequence[int],
                     cfg: float, s: BenchSettings, peak_gflops: float, device: torch.device,
                     log: Callable[[str], None] = _stderr) -> list[dict]:
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
        contenders = build_contenders(("student", "teacher"), t_model, s_model, t_cfg.sampling.steps, cfg,
                                      s.batch_size, device, s.compile, weights=_weights(s))
        student_row, teacher_row = measure(contenders, s, peak_gflops, device, log)
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


def run_bench(s: BenchSettings, log: Callable[[str], None] = _stderr) -> dict:
    """Run the benchmark described by `s`; returns the report (what `msdd bench` writes as JSON)."""
    previous_threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run_bench(s, log)
    finally:
        torch.set_num_threads(previous_threads)


def _weights(s: BenchSettings) -> torch.dtype | None:
    """bf16 runs keep the weights of every contender's matmuls and convolutions in bf16 (autocast would
    otherwise cast them again on every call: 17% of a paper-256 student decode on the 2-core CPU)."""
    return torch.bfloat16 if s.dtype == "bf16" else None


def _run_bench(s: BenchSettings, log: Callable[[str], None]) -> dict:
    device = torch.device(s.device)
    dtype = DTYPES[s.dtype]
    teacher, student = load_models(s, device)
    steps = resolve_steps(s.steps, teacher.config)
    cfg = teacher.config.sampling.cfg if s.cfg is None else float(s.cfg)
    for model in (teacher, student):  # a bad --resolutions fails before anything is timed
        for r in s.resolutions:
            at_resolution(model.config, r)
    if cfg in (0.0, 1.0) and {"teacher", "teacher-nocfg"} <= set(s.contenders):
        log(f"note: the teacher's cfg is {cfg:g} (a single pass per step), so `teacher` and `teacher-nocfg` are "
            f"the same decode; pass --cfg 2 to time guided decoding")
    peak_n = _peak_size(dtype, device)
    peak = measure_matmul_peak(dtype, None, device, n=peak_n, repeats=3 if s.quick else 5)
    conv_peak = measure_conv_peak(dtype, None, device, repeats=3 if s.quick else 5)
    log(f"matmul peak {peak:.1f} GFLOP/s ({peak_n}^3 {s.dtype}, {torch.get_num_threads()} threads), "
        f"3x3 conv {conv_peak:.1f} GFLOP/s")

    ssdd = None
    if {"ssdd-student", "ssdd-teacher"} & set(s.contenders):
        ssdd = ssdd_config(s.ssdd_preset, teacher.config.image_size)
    contenders = build_contenders(s.contenders, teacher, student, steps, cfg, s.batch_size, device, s.compile,
                                  ssdd, s.ssdd_steps, weights=_weights(s))
    log(f"decoding {s.batch_size} x {teacher.config.image_size} px: {', '.join(c.name for c in contenders)}")
    rows = measure(contenders, s, peak, device, log)
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    report = {
        "command": s.command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": None if s.model else s.preset, "overrides": list(s.overrides),
        "model": s.model, "student": s.student,
        "resolution": teacher.config.image_size, "num_stages": teacher.config.flow.num_stages,
        "teacher_steps": list(steps), "teacher_cfg": cfg,
        "ssdd_preset": (s.ssdd_preset or default_ssdd_preset(teacher.config.image_size)) if ssdd else None,
        "batch_size": s.batch_size, "dtype": s.dtype,
        "bf16": "weights of linear/conv layers stored in bf16, calls under bf16 autocast" if s.dtype == "bf16" else None,
        "compile": s.compile, "threads": torch.get_num_threads(),
        "device": str(device), "machine": _machine(device), "machine_peak_gflops": peak, "peak_matmul_size": peak_n,
        "conv_peak_gflops": conv_peak,
        "warmup": s.warmup, "rounds": s.rounds,
        "torch_version": torch.__version__, "diffusers_version": diffusers_version,
        "python_version": platform.python_version(),
        "contenders": rows,
    }
    if s.resolutions:
        report["resolution_table"] = resolution_table(teacher, student, s.resolutions, steps, cfg, s, peak, device, log)
    return _sig(report)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_report(report: dict) -> str:
    """The stdout tables of a report."""
    source = report["model"] or f"preset {report['preset']}"
    lines = [
        f"msdd bench: {source}, {report['resolution']} px, batch {report['batch_size']}, {report['dtype']}, "
        f"compile {'on' if report['compile'] else 'off'}, {report['threads']} threads, {report['device']} "
        f"({report['machine']}); peak GFLOP/s: matmul {report['machine_peak_gflops']:.1f} (the % below), "
        f"3x3 conv {report['conv_peak_gflops']:.1f}",
        f"{'contender':<14} {'img/s':>9} {'ms/batch median [min, max]':>30} {'GFLOP/img':>10} {'GFLOP/s':>9} "
        f"{'% peak':>7} {'x student':>9}",
    ]
    for r in report["contenders"]:
        if "error" in r:
            lines.append(f"{r['name']:<14} {r['error']}")
            continue
        ms = f"{r['seconds_median'] * 1e3:.1f} [{r['seconds_min'] * 1e3:.1f}, {r['seconds_max'] * 1e3:.1f}]"
        lines.append(f"{r['name']:<14} {r['img_per_s']:>9.3f} {ms:>30} {r['gflop_per_img']:>10.2f} "
                     f"{r['achieved_gflops']:>9.1f} {100 * r['fraction_of_peak']:>6.1f}% "
                     f"{_fmt(r.get('speed_vs_student'), '>9.3f')}")
    table = report.get("resolution_table")
    if table:
        lines += ["", "decode cost against resolution (one stage more per doubling)",
                  f"{'px':>5} {'stages':>6} {'student GFLOP/img':>18} {'student img/s':>14} "
                  f"{'teacher GFLOP/img':>18} {'teacher img/s':>14} {'teacher/student time':>21}"]
        for row in table:
            st, te = row["student"], row["teacher"]
            ratio = st["img_per_s"] / te["img_per_s"]
            lines.append(f"{row['resolution']:>5} {row['num_stages']:>6} {st['gflop_per_img']:>18.2f} "
                         f"{st['img_per_s']:>14.3f} {te['gflop_per_img']:>18.2f} {te['img_per_s']:>14.3f} "
                         f"{ratio:>21.1f}")
    return "\n".join(lines)
