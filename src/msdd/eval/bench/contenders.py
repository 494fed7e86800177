"""The contenders of a run: a model's decoder at a given schedule (student, teacher, single-scale, the SSDD
decoder), decoded and counted by its family, and `build_contenders`, which makes the named ones (the SD-VAE
lives in `sdvae.py`)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from msdd.config import ModelConfig, load_config
from msdd.eval.bench.models import Contender, FlowModel, compile_module, single_scale_config
from msdd.eval.bench.sdvae import sd_vae_contender
from msdd.eval.bench.settings import CONTENDERS, OPTIONAL_CONTENDERS
from msdd.models.layers import unoptimised
from msdd.models.precision import cast_weights, msdd_int8, quantise_int8


def _latents(config: ModelConfig, batch_size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *config.latent_shape, generator=g).to(device)  # (B, L, C) or (B, c, R/8, R/8)


def flow_contender(name: str, model: FlowModel, decoder: nn.Module, z: torch.Tensor, steps: Sequence[int],
                   guidance: float, seed: int = 0) -> Contender:
    """Decoding latents z with the family's `sample` at `steps` per stage and guidance scale `guidance`.
    `decoder` is `model.decoder` or its compiled wrapper; FLOPs are counted on a shape-only decoder that the
    family builds for `model.config`, the same network as the timed one (FlowModel builds it the same way)."""
    family = model.family
    steps = tuple(int(n) for n in steps)
    generator = torch.Generator(device=z.device)

    def decode_latents(latents: torch.Tensor):
        generator.manual_seed(seed)
        return family.sample(decoder, latents, steps, guidance, generator).images

    def decode():
        return decode_latents(z)

    with torch.device("meta"):  # shapes only
        shape_only = family.build_decoder()
    info = {"steps": list(steps), "cfg": guidance, "num_stages": len(steps),
            "passes_per_image": family.passes_per_image(steps, guidance),
            "params_M": sum(p.numel() for p in model.decoder.parameters()) / 1e6}
    return Contender(name, decode, family.decode_flops(shape_only, steps, guidance), info,
                     decode_latents=decode_latents, latent_shape=tuple(model.config.latent_shape))


def default_ssdd_preset(resolution: int) -> str:
    return "ssdd-m-256" if resolution >= 256 else "ssdd-tiny-64"


def ssdd_config(preset: str | None, resolution: int) -> ModelConfig:
    """The model section of an SSDD preset (default: `default_ssdd_preset`) at `resolution` px (the U-Net is
    convolutional and its RoPE grid follows the resolution; the token map, if any, is resized with it)."""
    config = load_config(preset or default_ssdd_preset(resolution)).model
    if config.family != "ssdd":
        raise ValueError(f"--ssdd-preset {preset!r} is a {config.family!r} model, not an SSDD one")
    config = dataclasses.replace(config, image_size=resolution)
    return config


def ssdd_contender(name: str, config: ModelConfig, steps: int, batch_size: int, device: torch.device,
                   compile: bool = False, seed: int = 0, weights: torch.dtype | None = None) -> Contender:
    """An SSDD decoder (random weights) decoding a fixed latent batch with `steps` Euler steps."""
    model = FlowModel.random(config, device)
    cast_weights(model.decoder, weights)
    run = compile_module(model.decoder, device) if compile else model.decoder
    c = flow_contender(name, model, run, _latents(config, batch_size, device), (steps,), 1.0, seed)
    return dataclasses.replace(c, info={**c.info, "family": config.family, "latent": list(config.latent_shape)})


def _in_bf16(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()

    return run


def _without_autocast(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    def run():
        with torch.autocast(device.type, enabled=False):
            return fn()

    return run


def _unoptimised(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with unoptimised():
            return fn()

    return run


def encoder_contenders(names: Sequence[str], student: FlowModel, decoder: nn.Module, batch_size: int,
                       device: torch.device, weights: torch.dtype | None) -> list[Contender]:
    """"encoder": encoding a batch of images; "student+encoder": encoding then decoding it with the
    student (one step per stage), the convention of the paper's reference code (it times both)."""
    from msdd.eval.flops import count_flops

    family, r = student.family, student.config.image_size
    encoder = student.encoder
    if encoder is None:
        with torch.device(device):
            encoder = family.build_encoder().eval()
    cast_weights(encoder, weights)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch_size, 3, r, r, generator=g) * 2 - 1).to(device)
    with torch.device("meta"):
        enc_flops = count_flops(family.build_encoder(), torch.zeros(1, 3, r, r))
        dec_flops = family.decode_flops(family.build_decoder(), (1,) * family.num_step_entries, 1.0)
    one_step = (1,) * family.num_step_entries
    generator = torch.Generator(device=device)

    def encode():
        return encoder(images)

    def encode_decode():
        generator.manual_seed(0)
        return family.sample(decoder, encoder(images), one_step, 1.0, generator).images

    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    rows = {"encoder": Contender("encoder", encode, enc_flops, {"encoder_params_M": params}),
            "student+encoder": Contender("student+encoder", encode_decode, enc_flops + dec_flops,
                                         {"steps": list(one_step), "cfg": 1.0, "encoder_params_M": params})}
    return [rows[n] for n in names]


def onnx_contender(name: str, student: FlowModel, batch_size: int) -> Contender:
    """The student's one-step-per-stage decode exported to ONNX (msdd.integrations.onnx, float32 weights)
    and run by onnxruntime on the CPU, its noise drawn as the PyTorch rows draw it."""
    import tempfile

    from msdd.integrations.onnx import draw_noise, export_decoder, require_onnx

    require_onnx("onnx", "onnxruntime")  # BenchSettings checks it before any timing; this is for the API's callers
    import onnxruntime as ort

    windows = student.family.windows
    one_step = (1,) * student.family.num_step_entries
    decoder = copy.deepcopy(student.decoder).float().cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        names = export_decoder(decoder, windows, student.config.latent_shape, one_step, 1.0, f"{tmp}/decoder.onnx")
        options = ort.SessionOptions()  # the run's thread count, as every PyTorch row has (onnxruntime's default:
        options.intra_op_num_threads = torch.get_num_threads()  # one thread per physical core)
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(f"{tmp}/decoder.onnx", options, providers=["CPUExecutionProvider"])
    z = _latents(student.config, batch_size, torch.device("cpu"))
    generator = torch.Generator()

    def decode():
        generator.manual_seed(0)
        noise = [n.numpy() for n in draw_noise(windows, batch_size, generator)]
        return torch.from_numpy(session.run(None, dict(zip(names, [z.numpy(), *noise])))[0])

    c = flow_contender(name, student, decoder, z, one_step, 1.0)  # FLOPs and info of the same decode
    return dataclasses.replace(c, decode=decode, info={**c.info, "dtype": "fp32", "runtime": "onnxruntime"},
                               decode_latents=None)


def build_contenders(names: Sequence[str], teacher: FlowModel, student: FlowModel, steps: Sequence[int],
                     guidance: float, batch_size: int, device: torch.device, compile: bool = False,
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
            compiled[id(model.decoder)] = compile_module(model.decoder, device)
        return compiled[id(model.decoder)]

    z = _latents(teacher.config, batch_size, device)
    out = []
    for name in names:
        if name == "student":
            one_step = (1,) * student.family.num_step_entries
            out.append(flow_contender(name, student, dec(student), _latents(student.config, batch_size, device),
                                      one_step, 1.0))
        elif name == "student-eager":  # the reference path (unfused ops, no cached modulation), uncompiled
            one_step = (1,) * student.family.num_step_entries
            c = flow_contender(name, student, student.decoder, _latents(student.config, batch_size, device),
                               one_step, 1.0)
            out.append(dataclasses.replace(c, decode=_unoptimised(c.decode), info={**c.info, "path": "reference"}))
        elif name == "student-bf16":  # the student again in bf16: the bf16/fp32 ratio in one run
            one_step = (1,) * student.family.num_step_entries
            half = FlowModel(student.config, cast_weights(copy.deepcopy(student.decoder), torch.bfloat16))
            c = flow_contender(name, half, dec(half), _latents(student.config, batch_size, device), one_step, 1.0)
            out.append(dataclasses.replace(c, decode=_in_bf16(c.decode, device), info={**c.info, "dtype": "bf16"}))
        elif name == "student-int8":  # the streams' matmuls in int8, the rest in the run's dtype (msdd's kernels)
            if device.type != "cpu":
                raise ValueError(f"--contenders student-int8 runs on the CPU only (this run: {device}); drop it")
            one_step = (1,) * student.family.num_step_entries
            int8 = quantise_int8(cast_weights(copy.deepcopy(student.decoder), torch.float32))
            rest = "bf16" if weights == torch.bfloat16 and msdd_int8() else "fp32"  # torch.ao's layers: fp32
            c = flow_contender(name, student, cast_weights(int8, weights if rest == "bf16" else None),
                               _latents(student.config, batch_size, device), one_step, 1.0)
            decode = c.decode if rest == "bf16" else _without_autocast(c.decode, device)
            info = {**c.info, "dtype": f"int8 matmuls, {rest} elsewhere"}
            out.append(dataclasses.replace(c, decode=decode, info=info))
        elif name in ("encoder", "student+encoder"):
            out += encoder_contenders([name], student, dec(student), batch_size, device, weights)
        elif name == "onnx-student":  # the same student decode as an ONNX graph under onnxruntime (fp32)
            out.append(onnx_contender(name, student, batch_size))
        elif name == "teacher":
            out.append(flow_contender(name, teacher, dec(teacher), z, steps, guidance))
        elif name == "teacher-nocfg":
            out.append(flow_contender(name, teacher, dec(teacher), z, steps, 1.0))
        elif name == "single-scale":
            single = teacher.with_config(single_scale_config(teacher.config, sum(steps), guidance))
            out.append(flow_contender(name, single, dec(single), z, (sum(steps),), guidance))
        elif name == "sd-vae":
            out.append(sd_vae_contender(teacher.config.image_size, batch_size, device, compile, weights))
        elif name in ("ssdd-student", "ssdd-teacher"):
            ssdd = ssdd or ssdd_config(None, teacher.config.image_size)
            n = 1 if name == "ssdd-student" else (ssdd_steps or ssdd.ssdd.steps)
            out.append(ssdd_contender(name, ssdd, n, batch_size, device, compile, weights=weights))
        else:
            raise ValueError(f"unknown contender {name!r}; expected one of {list(CONTENDERS + OPTIONAL_CONTENDERS)}")
    return out
