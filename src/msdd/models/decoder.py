"""Decoder (SPEC 4): an MMDiT velocity network shared by all stages of the multi-scale flow.

Inputs: the noisy image at the current stage x (B, 3, H_s, W_s), the model time tau (B,) and the
latent context z (B, L, C). The image is patchified into (H_s/p)^2 tokens, z is mapped to L context
tokens; both streams are modulated by the embedding of tau only. Output: the velocity (B, 3, H_s, W_s).
One set of weights serves every stage: only the number of image tokens changes.

The learnable null context (1, L, C) replaces z for classifier-free guidance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msdd.config import DecoderConfig
from msdd.models.layers import JointBlock, RopeCache, TimestepEmbedder, modulate


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)
        for layer in (self.adaln, self.linear):  # zero output at init: the first prediction is v = 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, image_size: int, latent_tokens: int, latent_dim: int) -> None:
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        self.latent_tokens, self.latent_dim = latent_tokens, latent_dim
        w, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Linear(3 * p * p, w)
        self.context_embed = nn.Linear(latent_dim, w)
        self.t_embed = TimestepEmbedder(w)
        self.null_context = nn.Parameter(torch.randn(1, latent_tokens, latent_dim))
        self.blocks = nn.ModuleList(
            JointBlock(w, cfg.heads, cfg.mlp_hidden, modulated=True, ctx_pre_only=(i == cfg.depth - 1))
            for i in range(cfg.depth)
        )
        self.final = FinalLayer(w, 3 * p * p)
        self.rope = RopeCache(image_size // p, latent_tokens, w // cfg.heads, cfg.context_pos)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity for noisy images x (B, 3, H, W) at model time tau (B,) given latents z (B, L, C)."""
        p = self.cfg.patch_size
        grid = x.shape[-1] // p
        h = self.patch_embed(rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p))  # (B, grid^2, W)
        ctx = self.context_embed(z.to(h.dtype))  # (B, L, W)
        c = self.t_embed(tau)  # (B, W)
        rope = self.rope(grid, x.device)
        for block in self.blocks:
            h, ctx = block(h, ctx, c, rope)
        out = self.final(h, c)  # (B, grid^2, p*p*3)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=p, q=p)

    def null_like(self, z: torch.Tensor) -> torch.Tensor:
        return self.null_context.expand(z.shape[0], -1, -1).to(z.dtype)
