"""Encoder (SPEC 3): image patches + learnable register tokens through MMDiT blocks -> latent tokens.

The register stream after the last block, LayerNorm, Linear(width -> latent_dim) is the latent z of
shape (B, L, C). A plain autoencoder latent: no KL term, no quantisation.

With `linear_path` (msdd.models.linear) a linear map of the whole image is added,
z = to_linear(x) + to_latent(norm(reg)); to_latent starts at zero, so a PCA-initialised encoder starts
as the PCA code and the transformer learns what to add to it.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from msdd.config import EncoderConfig
from msdd.models.layers import JointBlock, Linear
from msdd.models.rope import RopeCache
from msdd.models.linear import fp32_region


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, image_size: int, latent_tokens: int, latent_dim: int,
                 linear_path: bool = False) -> None:
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        w, p = cfg.width, cfg.patch_size
        self.grid = image_size // p
        self.patch_embed = nn.Conv2d(3, w, kernel_size=p, stride=p)
        # registers: std 0.02 (ViT's convention) or 1 (model.encoder.init=reference, the reference code)
        self.registers = nn.Parameter(torch.randn(1, latent_tokens, w) * (1.0 if cfg.init == "reference" else 0.02))
        self.blocks = nn.ModuleList(
            JointBlock(w, cfg.heads, cfg.mlp_hidden, modulated=False, img_pre_only=(i == cfg.depth - 1))
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.to_latent = Linear(w, latent_dim)
        self.rope = RopeCache(self.grid, latent_tokens, w // cfg.heads, cfg.context_pos)
        self.to_linear = None
        if linear_path:
            self.to_linear = nn.Linear(3 * image_size * image_size, latent_tokens * latent_dim)
            for layer in (self.to_linear, self.to_latent):  # set by init_linear_path; the residual starts at 0
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> z (B, L, C)."""
        x = rearrange(self.patch_embed(images), "b w h v -> b (h v) w")  # (B, grid*grid, W)
        reg = self.registers.to(x.dtype).repeat(images.shape[0], 1, 1)  # (B, L, W)
        rope = self.rope(self.grid, x.device)
        for block in self.blocks:
            x, reg = block(x, reg, None, rope)
        z = self.to_latent(self.norm(reg))
        if self.to_linear is not None:
            with fp32_region(images.device):  # the linear code in fp32
                z = z.float() + self.to_linear(images.float().flatten(1)).view(z.shape)
        return z
