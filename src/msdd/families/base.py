"""What every model family answers: `Family`, bound to one ModelConfig, plus the text form of `--steps`.

A family builds its encoder/decoder pair, knows its default decode schedule and checks a requested one,
decodes, gives the stage-1 loss and counts decoder passes and FLOPs. Callers ask the object (via
`msdd.families.family_of`) instead of testing `config.family`; a subclass overrides only what differs.
"""

from __future__ import annotations

import numbers
from functools import cached_property
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from msdd.config import ModelConfig
from msdd.config.model import MAX_STEPS
from msdd.eval.flops import count_flops
from msdd.flow.schedule import StageWindow, stage_windows
from msdd.models.encoder import Encoder


class Decoded(NamedTuple):
    """One decode: the images (B, 3, R, R) and the image at the end of every stage (the final image alone for a
    single-stage family)."""

    images: torch.Tensor
    stages: list[torch.Tensor]


def parse_steps(text: str | None) -> int | list[int] | None:
    """`--steps` text: '10' -> 10 (every stage), '30,30,30,30' -> a list, None -> None (the model's own)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected an int or a comma list of ints, e.g. 10 or 30,30,30,30") from None
    return values[0] if len(values) == 1 else values


class Family:
    """One model family under one config. `name` is the `model.family` value it serves."""

    name = ""
    multi_scale = False  # decodes coarse to fine through stage windows, tracing each stage's noise

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @cached_property
    def windows(self) -> tuple[StageWindow, ...]:
        """The stage windows of `config.flow` (the msdd decoder network takes them in every family)."""
        c = self.config
        return stage_windows(c.flow.num_stages, c.image_size, c.flow.gamma)

    # ------------------------------------------------------------------ networks

    def build(self) -> tuple[nn.Module, nn.Module]:
        """(encoder, decoder) with fresh weights, built in that order (the global RNG sees the same draws)."""
        encoder = self.build_encoder()
        return encoder, self.build_decoder()

    def build_encoder(self) -> nn.Module:
        c = self.config
        return Encoder(c.encoder, c.image_size, c.latent_tokens, c.latent_dim, linear_path=c.uses_linear_path)

    def build_decoder(self) -> nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------ decode schedule

    @property
    def num_step_entries(self) -> int:
        """How many entries a steps list has: one per stage."""
        return 1

    def default_steps(self) -> tuple[int, ...]:
        raise NotImplementedError

    def resolve_steps(self, steps: int | Sequence[int] | None) -> tuple[int, ...]:
        """Euler steps of a decode: the default for None, else whole numbers >= 1, one int for every stage or
        one per stage (1.7, a bool or a string is a ValueError, never truncated to an int)."""
        if steps is None:
            return self.default_steps()
        entries = self.num_step_entries
        if isinstance(steps, (torch.Tensor, np.ndarray)):
            steps = steps.tolist()
        many = isinstance(steps, Sequence) and not isinstance(steps, str)
        values = list(steps) if many else [steps]
        bad = [n for n in values if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer))]
        if bad:
            raise ValueError(f"steps must be whole numbers >= 1 (an int, or a list of {entries} ints: one per stage), "
                             f"got {steps!r}: {bad[0]!r} is a {type(bad[0]).__name__}; pass ints (they are never "
                             "rounded)")
        steps = tuple(int(n) for n in values) * (1 if many else entries)
        if len(steps) != entries or any(n < 1 for n in steps):
            raise ValueError(self.bad_steps_message(steps))
        if max(steps) > MAX_STEPS:  # 10**9 allocated its schedule until the memory ran out
            raise ValueError(f"steps {max(steps):,} per stage is more than msdd decodes ({MAX_STEPS:,}); the teachers' "
                             f"schedules converge by 30 to 100 steps per stage")
        return steps

    def bad_steps_message(self, steps: tuple[int, ...]) -> str:
        entries = self.num_step_entries
        return f"steps must be an int >= 1 or a list of {entries} ints >= 1 (one per stage), got {steps}"

    def resolve_guidance(self, guidance: float | None) -> float:
        """The guidance scale of a decode: the model's by default; a finite number >= 0."""
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real)
                                     or not (np.isfinite(float(guidance)) and float(guidance) >= 0)):
            raise ValueError(f"guidance (--cfg) must be a finite number >= 0 (1 = no guidance, the model's default is "
                             f"{self.config.sampling.cfg:g}), got {guidance!r}")
        return self.config.sampling.cfg if guidance is None else float(guidance)

    def guidance_factor(self, guidance: float) -> int:
        """Decoder passes per Euler step (2 where guidance runs a conditional and a null pass)."""
        return 1

    def passes_per_image(self, steps: Sequence[int], guidance: float) -> int:
        """Decoder forward passes per image of a decode."""
        return sum(steps) * self.guidance_factor(guidance)

    # ------------------------------------------------------------------ decode and training loss

    def sample(self, decoder: nn.Module, z: torch.Tensor, steps: Sequence[int], guidance: float,
               generator) -> Decoded:
        """Decode checked latents with resolved steps and guidance, without clamping or `no_grad`."""
        raise NotImplementedError

    def loss(self, decoder: nn.Module, images: torch.Tensor, z: torch.Tensor, generator,
             perceptual: nn.Module | None = None,
             repa: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage-1 loss on images (B, 3, R, R) and their latents z; (loss, {name: detached value})."""
        raise NotImplementedError

    @property
    def lpips_setting(self) -> tuple[str, float]:
        """(config field, weight) of the LPIPS term of the stage-1 loss."""
        return "model.flow.lpips_weight", self.config.flow.lpips_weight

    @property
    def repa_setting(self) -> tuple[str, float]:
        """(config field, weight) of the REPA (DINOv2 feature) term of the stage-1 loss; weight 0: none."""
        return "", 0.0

    @property
    def inert_settings(self) -> list[str]:
        """Settings of the stage-1 loss that this configuration accepts but does not use, each with its fix
        (the trainer warns with them)."""
        return []

    # ------------------------------------------------------------------ cost

    def pass_resolutions(self) -> list[int]:
        """The image resolution of a decoder pass at each stage."""
        return [self.config.image_size]

    def pass_flops(self, decoder: nn.Module, batch: int = 1) -> list[int]:
        """FLOPs of one forward pass of `decoder` at each stage, for `batch` images (zero inputs)."""
        device = next(decoder.parameters()).device
        z = torch.zeros(batch, *self.config.latent_shape, device=device)
        tau = torch.zeros(batch, device=device)
        return [count_flops(decoder, torch.zeros(batch, 3, r, r, device=device), tau, z)
                for r in self.pass_resolutions()]

    def decode_flops(self, decoder: nn.Module, steps: Sequence[int], guidance: float, batch: int = 1) -> int:
        """FLOPs of a full decode with `steps` per stage."""
        return self.flops_of_steps(self.pass_flops(decoder, batch), steps, guidance)

    def flops_of_steps(self, pass_flops: Sequence[int], steps: Sequence[int], guidance: float) -> int:
        """FLOPs of a decode from those of one pass per stage (`pass_flops`)."""
        return sum(n * f for n, f in zip(steps, pass_flops)) * self.guidance_factor(guidance)

    def info(self, head: dict, passes: list[int]) -> dict:
        """`msdd info`: `head` (sizes, parameters, encoder FLOPs) with this family's decode described;
        `passes` are the FLOPs of one decoder pass per stage."""
        return {"family": self.name, **head, "gflop_per_pass": round(passes[0] / 1e9, 3)}
