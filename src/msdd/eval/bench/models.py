"""The decoders under test: a flow decoder with the config it decodes with (random weights of a preset or a
trained model; encoders are never built), the configs derived from it (other resolutions, the single-scale
ablation), and `Contender`, one timed decode with its FLOPs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from msdd.config import ModelConfig, load_config
from msdd.eval.bench.settings import BenchSettings
from msdd.models.decoder import Decoder
from msdd.tokenizer import Tokenizer


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


@dataclass
class Contender:
    name: str
    decode: Callable[[], object] | None  # decodes the fixed batch once; None when unavailable
    flop_per_image: int | None = None
    info: dict = field(default_factory=dict)  # steps, cfg, passes per image...: copied into the report
    error: str | None = None


def cast_weights(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Store the weights of the linear and convolution layers of `module` in `dtype`, in place (bf16
    inference: autocast then has no weight to cast on every call; norms and buffers stay fp32)."""
    if dtype is not None:
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                m.to(dtype)
    return module
