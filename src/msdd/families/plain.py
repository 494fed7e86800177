"""The plain family: the token encoder and the msdd decoder network used once, x = decoder(zeros, tau = 0,
z), trained with MSE (+ LPIPS at flow.lpips_weight): the deterministic autoencoder baseline that shows
what the diffusion decoder adds. `steps` and guidance are ignored."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from msdd.families.base import Decoded, Family
from msdd.families.msdd import flow_decoder


class PlainFamily(Family):
    name = "plain"

    def build_decoder(self) -> nn.Module:
        return flow_decoder(self, "v")

    def default_steps(self) -> tuple[int, ...]:
        return (1,)

    def resolve_steps(self, steps: int | Sequence[int] | None) -> tuple[int, ...]:
        return self.default_steps()  # always one pass, whatever was asked

    def resolve_guidance(self, guidance: float | None) -> float:
        super().resolve_guidance(guidance)  # a number at all
        return 1.0

    def one_pass(self, decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """The decode: the decoder on a zero image at tau = 0 (+ x_lin with a linear path)."""
        r, b = self.config.image_size, z.shape[0]
        return decoder.end_estimate(z.new_zeros(b, 3, r, r), z.new_zeros(b), z).float()

    def sample(self, decoder: nn.Module, z: torch.Tensor, steps: Sequence[int], guidance: float,
               generator) -> Decoded:
        x = self.one_pass(decoder, z)
        return Decoded(x, [x])

    def loss(self, decoder, images, z, generator, perceptual=None, repa=None):
        x = self.one_pass(decoder, z)
        loss = (x - images).pow(2).mean()
        terms = {"loss_mse": loss.detach()}
        weight = self.config.flow.lpips_weight
        if perceptual is not None and weight > 0:
            l_lpips = perceptual(x, images).mean()
            loss = loss + weight * l_lpips
            terms["loss_lpips"] = l_lpips.detach()
        return loss, terms

    def info(self, head: dict, passes: list[int]) -> dict:
        return {**super().info(head, passes), "decode": {"passes": 1, "gflop_per_image": round(passes[0] / 1e9, 3)}}
