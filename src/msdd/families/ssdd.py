"""The ssdd family (SPEC 10, `msdd.models.ssdd`): token encoder (z (B, L, C)) or f8 conv encoder
(z (B, c, R/8, R/8)) + a U-Net/transformer flow decoder at full resolution; `steps` is one int N (the
schedule t = (1 - i/N)^shift); no guidance (trained without a null latent)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from msdd.families.base import Decoded, Family
from msdd.flow.ssdd import sample_ssdd, ssdd_loss, time_schedule
from msdd.models.ssdd import SpatialEncoder, SSDDDecoder


class SSDDFamily(Family):
    name = "ssdd"

    def build_encoder(self) -> nn.Module:
        return SpatialEncoder(self.config) if self.config.spatial_latent else super().build_encoder()

    def build_decoder(self) -> nn.Module:
        return SSDDDecoder(self.config)

    def default_steps(self) -> tuple[int, ...]:
        return (1,) if self.config.one_step else (self.config.ssdd.steps,)

    def bad_steps_message(self, steps: tuple[int, ...]) -> str:
        return f"steps must be an int >= 1 for an SSDD model (a single flow), got {steps}"

    def resolve_guidance(self, guidance: float | None) -> float:
        super().resolve_guidance(guidance)  # a number at all
        if guidance is not None and float(guidance) != 1.0:
            raise ValueError(f"SSDD models have no classifier-free guidance (trained without a null latent); "
                             f"guidance (--cfg) must be 1, got {guidance}")
        return 1.0

    def sample(self, decoder: nn.Module, z: torch.Tensor, steps: Sequence[int], guidance: float,
               generator) -> Decoded:
        x = sample_ssdd(decoder, z, steps[0], self.config.ssdd.shift, generator=generator)
        return Decoded(x, [x])

    def loss(self, decoder, images, z, generator, perceptual=None, repa=None):
        ssdd = self.config.ssdd
        return ssdd_loss(decoder, images, z, t_sampling=ssdd.t_sampling, perceptual=perceptual,
                         lpips_weight=ssdd.lpips_weight, repa=repa, repa_weight=ssdd.repa_weight, generator=generator)

    @property
    def lpips_setting(self) -> tuple[str, float]:
        return "model.ssdd.lpips_weight", self.config.ssdd.lpips_weight

    @property
    def repa_setting(self) -> tuple[str, float]:
        return "model.ssdd.repa_weight", self.config.ssdd.repa_weight

    def info(self, head: dict, passes: list[int]) -> dict:
        c, ssdd = self.config, self.config.ssdd
        n = self.default_steps()[0]
        gflop = lambda steps: round(self.flops_of_steps(passes, (steps,), 1.0) / 1e9, 3)  # noqa: E731
        return {
            **super().info(head, passes),
            "ssdd": {"latent_kind": ssdd.latent_kind, "base_channels": ssdd.base_channels,
                     "channel_mults": list(ssdd.channel_mults), "blocks_per_level": ssdd.blocks_per_level,
                     "bottleneck_grid": c.image_size // 2 ** (len(ssdd.channel_mults) - 1),
                     "mid_depth": ssdd.mid_depth, "mid_width": ssdd.width, "mid_heads": ssdd.mid_heads},
            "decode": {"steps": n, "schedule_t": [round(t, 4) for t in time_schedule(n, ssdd.shift)],
                       "gflop_per_image": gflop(n), "one_step_gflop_per_image": gflop(1),
                       "teacher_steps": ssdd.steps, "teacher_gflop_per_image": gflop(ssdd.steps)},
        }
