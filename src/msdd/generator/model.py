"""The latent generator network: a DiT/SiT-style transformer that predicts the flow velocity of a tokenizer
latent (`msdd.generator.flow` has the path, the loss and the sampler).

    latent  (B, L, C) tokens: each token one sequence element, 1-D RoPE over its index
            (B, c, h, w) grid (square): p x p patches, (h/p)(w/p) tokens of c p p values, 2-D RoPE over the patch grid
    embed   a linear map of each token to the width, plus a learnt absolute position embedding: RoPE alone sees
            only relative positions, and a tokenizer's 1-D tokens differ in their statistics by index (without
            it tiny-64's per-token means were not learnt: correlation 0.13 between data and samples)
    blocks  `depth` adaLN-Zero transformer blocks (`msdd.models.layers.Stream`: the modulated stream of the
            decoder's MMDiT block, alone), conditioned on c = timestep embedding + class embedding
    out     the decoder's final layer (`msdd.models.decoder.FinalLayer`): adaLN-modulated LayerNorm and a
            zero-initialised linear map back to the latent's shape

Class-conditional generators (config.num_classes = K > 0) embed K + 1 labels: label K is the null class
of classifier-free guidance. With K = 0 the generator is unconditional and takes no labels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from msdd.eval.flops import count_flops
from msdd.flow.sampler import passes_per_step
from msdd.generator.config import GeneratorConfig
from msdd.models.decoder import FinalLayer
from msdd.models.layers import Stream, attention
from msdd.models.rope import RopeCache
from msdd.models.timestep import TimestepEmbedder


class LatentDiT(nn.Module):
    """Velocity v(x_t, t, label) for normalised latents of one `latent_shape` (module docstring)."""

    def __init__(self, config: GeneratorConfig, latent_shape: Sequence[int]) -> None:
        super().__init__()
        self.config, self.latent_shape = config, tuple(int(n) for n in latent_shape)
        w, p = config.width, config.patch_size
        self.spatial = len(self.latent_shape) == 3  # (c, h, w) grid; else (L, C) tokens
        head_dim = w // config.heads
        if self.spatial:
            c, h, wd = self.latent_shape
            if h != wd or h % p:
                raise ValueError(f"invalid config value for `generator.patch_size`: the latent grid {h} x {wd} must "
                                 f"be square and divisible by the patch size {p}")
            self.grid = h // p
            token_dim, num_tokens = c * p * p, self.grid**2
            self.rope = RopeCache(self.grid, 0, head_dim, "none")  # 2-D RoPE over the patch grid
        elif len(self.latent_shape) == 2:
            num_tokens, token_dim = self.latent_shape
            self.grid = 0
            self.rope = RopeCache(0, num_tokens, head_dim, "1d")  # 1-D RoPE over the token index
        else:
            raise ValueError(f"a latent shape is (tokens, channels) or (channels, height, width), got {latent_shape}")
        self.num_tokens = num_tokens
        self.embed = nn.Linear(token_dim, w)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, w) * 0.02)  # (1, N, W) absolute positions
        self.t_embed = TimestepEmbedder(w, time_scale=config.time_scale)
        self.y_embed = nn.Embedding(config.num_classes + 1, w) if config.num_classes else None
        self.blocks = nn.ModuleList(Stream(w, config.heads, config.mlp_hidden, modulated=True, pre_only=False)
                                    for _ in range(config.depth))
        self.final = FinalLayer(w, token_dim)

    @property
    def conditional(self) -> bool:
        return self.y_embed is not None

    @property
    def null_class(self) -> int:
        """The label of the null class (classifier-free guidance's unconditional branch)."""
        return self.config.num_classes

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of latents -> (B, N, token_dim)."""
        if not self.spatial:
            return x  # (B, L, C)
        p = self.config.patch_size
        return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, token_dim) -> a batch of latents (the inverse of `to_tokens`)."""
        if not self.spatial:
            return tokens
        p = self.config.patch_size
        return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=self.grid, p=p, q=p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, *latent_shape) at time t (B,) in [0, 1] (1: noise); labels (B,) ints in [0, num_classes]
        (num_classes: the null class) for a conditional generator, None otherwise. Returns v like x."""
        if self.conditional != (labels is not None):
            raise ValueError("a class-conditional generator needs labels (B,), an unconditional one takes none"
                             if self.conditional else "this generator is unconditional (num_classes 0): pass no labels")
        c = self.t_embed(t)  # (B, W)
        if labels is not None:
            c = c + self.y_embed(labels)
        h = self.embed(self.to_tokens(x)) + self.pos_embed  # (B, N, W)
        rope = self.rope(self.grid, h.device)
        for block in self.blocks:
            q, k, v, mods = block.pre(h, c)
            h = block.post(h, attention(q, k, v, rope), mods)
        return self.from_tokens(self.final(h, c))


def build_generator(config: GeneratorConfig, latent_shape: Sequence[int]) -> LatentDiT:
    """A fresh generator for latents of `latent_shape` (a tokenizer's `config.latent_shape`)."""
    return LatentDiT(config, latent_shape)


def generator_flops(model: LatentDiT, batch: int = 1) -> int:
    """FLOPs of one forward pass of `model` for `batch` latents, counted on a shape-only (`meta`) copy."""
    with torch.device("meta"):
        shape_only = LatentDiT(model.config, model.latent_shape)
        x = torch.zeros(batch, *model.latent_shape)
        t = torch.zeros(batch)
        labels = torch.zeros(batch, dtype=torch.long) if model.conditional else None
    return count_flops(shape_only, x, t, labels)


def sampling_flops(model: LatentDiT, steps: int, guidance: float, batch: int = 1) -> int:
    """FLOPs of sampling `batch` latents with `steps` Euler steps at guidance scale `guidance`."""
    return steps * generator_flops(model, batch * passes_per_step(guidance))

