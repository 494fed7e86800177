"""The contenders of a run: the flow decoder at a given schedule (student, teacher, single-scale), the SSDD
decoder, and `build_contenders`, which makes the named ones (the SD-VAE lives in `sdvae.py`)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from msdd.config import ModelConfig, load_config
from msdd.eval.bench.models import Contender, FlowModel, cast_weights, single_scale_config
from msdd.eval.bench.sdvae import sd_vae_contender
from msdd.eval.bench.settings import CONTENDERS
from msdd.eval.flops import count_flops, decode_flops
from msdd.flow.sampler import sample
from msdd.flow.schedule import stage_windows
from msdd.flow.ssdd import sample_ssdd
from msdd.models.ssdd import SSDDDecoder
from msdd.tokenizer import Tokenizer


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
