"""The decoders under test: a decoder with the config it decodes with, built by the config's family (random
weights of a preset or a trained model; encoders are never built), the configs derived from it (other
resolutions, the single-scale ablation), and `Contender`, one timed decode with its FLOPs."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from msdd.config import ModelConfig, load_config
from msdd.eval.bench.settings import BenchSettings
from msdd.families import Family, family_of
from msdd.models.compiling import compiler_problem
from msdd.tokenizer import Tokenizer


@dataclass(frozen=True)
class FlowModel:
    config: ModelConfig
    decoder: nn.Module
    encoder: nn.Module | None = None  # a loaded model's encoder (random weights otherwise, built when needed)

    @property
    def family(self) -> Family:
        return family_of(self.config)

    @classmethod
    def random(cls, config: ModelConfig, device: torch.device) -> "FlowModel":
        """Random weights of the decoder that `Tokenizer(config)` holds (linear path and refiner included)."""
        with torch.device(device):
            decoder = family_of(config).build_decoder()
        return cls(config, decoder.eval())

    @classmethod
    def load(cls, path: str, device: torch.device) -> "FlowModel":
        tok = Tokenizer.from_pretrained(path, device=device)
        if not tok.family.multi_scale:
            raise ValueError(f"{path} is a {tok.config.family!r} model; --model / --student take multi-scale (msdd) "
                             f"models (the ssdd-* rows are built from --ssdd-preset)")
        return cls(tok.config, tok.decoder, tok.encoder)

    def with_config(self, config: ModelConfig) -> "FlowModel":
        """The same weights (the parameter objects, shared, not copied) in the decoder that `config`'s family
        builds for another resolution (RoPE grid) or number of stages (x-prediction's windows). Weights whose
        shape follows the resolution (the linear path's map to R x R pixels) start as a fresh decoder's."""
        family, own = family_of(config), self.decoder.state_dict(keep_vars=True)
        with torch.device("meta"):  # shapes only, unless some weights cannot be shared
            decoder = family.build_decoder()
        fresh = {k for k, v in decoder.state_dict().items() if k not in own or own[k].shape != v.shape}
        if fresh:
            with torch.device(next(self.decoder.parameters()).device):
                decoder = family.build_decoder()
        decoder.load_state_dict({k: v for k, v in own.items() if k not in fresh}, strict=not fresh, assign=True)
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
        smallest = config.image_size // 2 ** (config.flow.num_stages - 1)
        raise ValueError(f"--resolutions: {resolution} px would leave {stages} stages for this "
                         f"{config.flow.num_stages}-stage {config.image_size} px model; give {smallest} px or more")
    steps = (tuple(config.sampling.steps) + (config.sampling.steps[-1],) * max(0, k))[:stages]
    new = dataclasses.replace(config, image_size=resolution,
                              flow=dataclasses.replace(config.flow, num_stages=stages),
                              sampling=dataclasses.replace(config.sampling, steps=steps))
    return new


def single_scale_config(config: ModelConfig, total_steps: int, guidance: float) -> ModelConfig:
    """The same architecture with one stage at full resolution and `total_steps` Euler steps."""
    new = dataclasses.replace(config, flow=dataclasses.replace(config.flow, num_stages=1),
                              sampling=dataclasses.replace(config.sampling, steps=(total_steps,), cfg=guidance))
    return new


def load_models(settings: BenchSettings, device: torch.device) -> tuple[FlowModel, FlowModel]:
    """(teacher, student): --model (or random weights of the preset) and --student (or the same model)."""
    if settings.model:
        teacher = FlowModel.load(settings.model, device)
    else:
        teacher = FlowModel.random(load_config(settings.preset, list(settings.overrides)).model, device)
    student = FlowModel.load(settings.student, device) if settings.student else teacher
    if student.config.image_size != teacher.config.image_size:
        raise ValueError(f"--student is a {student.config.image_size} px model but the teacher is "
                         f"{teacher.config.image_size} px; both must decode the same resolution")
    if settings.resolution and settings.resolution != teacher.config.image_size:
        teacher = teacher.with_config(_resized(teacher.config, settings.resolution))
        if settings.student:
            student = student.with_config(_resized(student.config, settings.resolution))
        else:
            student = teacher
    return teacher, student


def _resized(config: ModelConfig, resolution: int) -> ModelConfig:
    """`config` at `--resolution` with the same stages, or an error naming the nearest sizes it decodes."""

    def fits(r: int) -> bool:
        try:
            dataclasses.replace(config, image_size=r)
            return True
        except ValueError:
            return False

    try:
        return dataclasses.replace(config, image_size=resolution)
    except ValueError as e:
        below = next((r for r in range(resolution - 1, 0, -1) if fits(r)), None)
        above = next(r for r in range(resolution + 1, 2 * resolution + config.image_size + 1) if fits(r))
        nearest = f"{below} or {above}" if below else str(above)
        raise ValueError(f"--resolution {resolution} does not fit this model's {config.flow.num_stages} stages and "
                         f"patches ({e}); give one that does, e.g. {nearest}") from None


@dataclass
class Contender:
    name: str
    decode: Callable[[], object] | None  # decodes the fixed batch once; None when unavailable
    flop_per_image: int | None = None
    info: dict = field(default_factory=dict)  # steps, cfg, passes per image...: copied into the report
    error: str | None = None
    decode_latents: Callable[[torch.Tensor], object] | None = None  # the same decode of other latents
    latent_shape: tuple[int, ...] | None = None  # of one image's latent (what decode_latents takes, per image)


def compile_module(module: nn.Module, device: torch.device) -> nn.Module:
    """`torch.compile(module)`, or `module` itself with a warning where inductor has no compiler for
    `device` (a C++ compiler on the CPU, triton on CUDA)."""
    if problem := compiler_problem(device):
        warnings.warn(f"--compile skipped, decoding uncompiled: {problem}", stacklevel=2)
        return module
    return torch.compile(module)
