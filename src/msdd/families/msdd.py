"""The msdd family (SPEC 3-6): token encoder + the multi-scale MMDiT flow decoder; z (B, L, C); Euler
steps per stage and classifier-free guidance."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from msdd.families.base import Decoded, Family
from msdd.flow.path import flow_loss
from msdd.flow.sampler import passes_per_step, sample_multiscale
from msdd.models.decoder import Decoder


def flow_decoder(family: Family, prediction: str) -> Decoder:
    """The MMDiT decoder network of `family.config` (msdd, and plain's one pass) with its linear path,
    refiner and stage windows."""
    c = family.config
    return Decoder(c.decoder, c.image_size, c.latent_tokens, c.latent_dim, linear_path=c.uses_linear_path,
                   windows=family.windows, prediction=prediction, refiner=(c.refiner_width, c.refiner_blocks))


class MSDDFamily(Family):
    name = "msdd"
    multi_scale = True

    def build_decoder(self) -> nn.Module:
        return flow_decoder(self, self.config.flow.prediction)

    @property
    def num_step_entries(self) -> int:
        return self.config.flow.num_stages

    def default_steps(self) -> tuple[int, ...]:
        c = self.config
        return (1,) * c.flow.num_stages if c.one_step else tuple(c.sampling.steps)

    def guidance_factor(self, guidance: float) -> int:
        return passes_per_step(guidance)

    def sample(self, decoder: nn.Module, z: torch.Tensor, steps: Sequence[int], guidance: float,
               generator) -> Decoded:
        with decoder.same_latents() if hasattr(decoder, "same_latents") else contextlib.nullcontext():
            out = sample_multiscale(decoder, z, self.windows, steps, guidance=guidance, generator=generator,
                                    noises=False)
        return Decoded(out.image, out.stages)

    def loss(self, decoder, images, z, generator, perceptual=None, repa=None):
        fc = self.config.flow
        loss, per_stage = flow_loss(
            decoder, images, z, self.windows,
            t_sampling=fc.t_sampling, loss_weighting=fc.loss_weighting, sigmoid_bias=fc.sigmoid_bias,
            loss_reduction=fc.loss_reduction,
            prediction=fc.prediction,
            cfg_drop=fc.cfg_drop, null_context=decoder.null_context,
            perceptual=perceptual, perceptual_weight=fc.lpips_weight, generator=generator,
        )
        return loss, {f"loss_stage{stage}": v for stage, v in per_stage.items()}

    @property
    def inert_settings(self) -> list[str]:
        fc = self.config.flow
        if fc.prediction == "x" and fc.loss_weighting != "none":  # flow_loss weights the v-prediction loss only
            return [f"model.flow.loss_weighting={fc.loss_weighting} does nothing with model.flow.prediction=x (the "
                    "loss is the plain MSE on the stage end): set it to none, or use prediction v"]
        return []

    def pass_resolutions(self) -> list[int]:
        return [w.resolution for w in self.windows]

    def info(self, head: dict, passes: list[int]) -> dict:
        c, steps = self.config, self.default_steps()
        stages = [
            {"stage": w.index, "resolution": w.resolution, "image_tokens": (w.resolution // c.decoder.patch_size) ** 2,
             "t": [round(w.t_start, 4), round(w.t_end, 4)], "tau": [round(w.tau_start, 4), round(w.tau_end, 4)],
             "alpha": round(w.alpha, 4), "beta": round(w.beta, 4), "gflop_per_pass": round(f / 1e9, 3)}
            for w, f in zip(self.windows, passes)
        ]
        flops = self.flops_of_steps(passes, steps, c.sampling.cfg)
        return {**head, "stages": stages,
                "decode": {"steps_per_stage": list(steps), "cfg": c.sampling.cfg,
                           "gflop_per_image": round(flops / 1e9, 3),
                           "one_step_gflop_per_image": round(sum(passes) / 1e9, 3)}}
