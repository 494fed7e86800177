"""End-to-end generation (`msdd bench --pipeline`): a latent generator samples latents, a decoder turns
them into images, timed as one call per batch.

Every decoder row gets its own generator of the same preset (width, depth, heads; random weights) over
its own latent: msdd's 128 x 32 tokens (128 tokens), or an f8c4 grid (4 x 32 x 32 at 256 px, patch 2:
256 tokens) for SSDD and the SD-VAE. A call: `sample_latents` (N Euler steps, guidance as one doubled
batch), then the row's decode of those latents. The generator's time is measured inside every call, so
each row reports the share of its time spent in the decoder; FLOPs per image are the generator's N x
(passes per step) forward passes plus the decoder's.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Sequence

import torch

from msdd.eval.bench.models import Contender
from msdd.eval.bench.timing import synchronizer
from msdd.generator import build_generator, generator_flops, load_gen_config, sample_latents, sampling_flops
from msdd.models.precision import cast_weights


def default_gen_preset(resolution: int) -> str:
    return "gen-xl" if resolution >= 256 else "gen-tiny"


@dataclasses.dataclass(frozen=True)
class GeneratorSettings:
    preset: str
    steps: int
    guidance: float  # --gen-cfg; a guided step runs the null class in the same (doubled) batch

    @classmethod
    def of(cls, preset: str, steps: int, guidance: float) -> "GeneratorSettings":
        """The settings as they run: an unconditional preset (num_classes 0) has no guidance (1)."""
        return cls(preset, steps, guidance if load_gen_config(preset).generator.num_classes else 1.0)


def pipeline_contender(decoder: Contender, gen: GeneratorSettings, batch_size: int, device: torch.device,
                       weights: torch.dtype | None = None, seed: int = 0,
                       built: dict[tuple, torch.nn.Module] | None = None) -> Contender:
    """`decoder` preceded by a random generator of `gen.preset` over its latent; `decoder` must have
    `decode_latents` (every PyTorch row does). `built`: generators already made, by latent shape (rows with
    the same latent share one; a gen-xl generator holds 675M parameters)."""
    if decoder.decode is None or decoder.decode_latents is None:
        return dataclasses.replace(decoder, decode=None,
                                   error=decoder.error or "this row cannot decode generated latents")
    config, guidance = load_gen_config(gen.preset).generator, gen.guidance
    built = {} if built is None else built
    if decoder.latent_shape not in built:
        with torch.device(device):
            built[decoder.latent_shape] = cast_weights(build_generator(config, decoder.latent_shape).eval(), weights)
    model = built[decoder.latent_shape]
    generator = torch.Generator(device=device)
    sync = synchronizer(device)
    generator_seconds: list[float] = []

    def run():
        generator.manual_seed(seed)
        t0 = time.perf_counter()
        latents = sample_latents(model, batch_size, gen.steps, guidance, generator=generator)
        sync()
        generator_seconds.append(time.perf_counter() - t0)
        return decoder.decode_latents(latents)

    with torch.device("meta"):
        shape_only = build_generator(config, decoder.latent_shape)
    per_pass, gen_flops = generator_flops(shape_only), sampling_flops(shape_only, gen.steps, guidance)
    info = {**decoder.info, "generator": gen.preset, "generator_steps": gen.steps, "generator_cfg": guidance,
            "generator_tokens": shape_only.num_tokens,
            "generator_params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "generator_gflop_per_pass": per_pass / 1e9, "generator_gflop_per_img": gen_flops / 1e9,
            "decoder_gflop_per_img": decoder.flop_per_image / 1e9}
    info["generator_seconds"] = generator_seconds  # filled as it runs; read by `decoder_shares`
    return Contender(decoder.name, run, gen_flops + decoder.flop_per_image, info)


def decoder_shares(row: dict, rounds: int) -> dict:
    """A measured pipeline row with the generator's and the decoder's median seconds per call and the
    decoder's share of each timed call (the generator's time was recorded inside every call)."""
    if "seconds" not in row:
        row.pop("generator_seconds", None)
        return row
    timed_gen: Sequence[float] = row.pop("generator_seconds")[-rounds:]  # the last `rounds` calls were timed
    shares = [(total - g) / total for total, g in zip(row["seconds"], timed_gen)]
    gen_median = statistics.median(timed_gen)
    return {**row, "generator_seconds_median": gen_median, "decoder_seconds_median": row["seconds_median"] - gen_median,
            "decoder_share": statistics.median(shares)}
