"""The timestep embedding that conditions the flow decoders and the latent generator."""

from __future__ import annotations

import math

import torch
from torch import nn

from msdd.models.layers import Linear


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (256 dims) of time_scale * tau, tau in [0, 1] the model time, then an MLP."""

    def __init__(self, width: int, freq_dim: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(Linear(freq_dim, width), nn.SiLU(), Linear(width, width))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
        args = (tau.float() * self.time_scale)[:, None] * freqs[None]  # (B, half); x1000 spreads tau over them
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
