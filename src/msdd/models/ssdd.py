"""SSDD decoder family (SPEC 10): a pixel-space U-Net with a transformer at its bottleneck, and the
convolutional f8 spatial latent encoder.

Decoder inputs: the noisy image x_t (B, 3, R, R), the flow time t (B,) in [0, 1] (t = 1 is noise) and
the latent z, either tokens (B, L, C) or a spatial map (B, c, R/8, R/8). Output: the velocity
v = noise - image (B, 3, R, R).

    latent map    m = z (spatial), or a learned linear map of the flattened tokens (L*C -> c*R/8*R/8)
    conditioning  cond = embed(t) + MLP(mean over positions of Linear(c -> width)(m))      (B, width)
    input         concat[x_t, (x_lin,) nearest-upsampled m]  (B, 3 (+ 3) + c, R, R) -> 3x3 conv
    down          per level: ResBlocks (GroupNorm, adaptive scale/shift from cond) + stride-2 conv
    bottleneck    transformer blocks over the (R / 2^(levels-1))^2 positions: self-attention with 2D
                  RoPE, SwiGLU MLP, adaLN from cond (one stream of the MMDiT block of layers.py)
    up            per level: ResBlocks on concat[h, skip] + nearest x2 + 3x3 conv
    output        GroupNorm, SiLU, 3x3 conv (zero-initialised: the first prediction is v = 0)

Options (`model.linear_path` with the token latent, `model.ssdd.prediction`): with the linear path the
decoder also sees x_lin = from_linear(z) (PCA-initialised, msdd.models.linear) as 3 input channels; with
x-prediction the network's output is the image estimate x_hat (+ x_lin), the velocity the sampler uses
is (x_t - x_hat) / t, and a fresh model with both decodes as the PCA code (the output starts at zero).

REPA: when `repa_weight > 0` a small MLP (`repa_proj`) projects the bottleneck tokens after the first
half of the transformer blocks to the DINOv2 feature width; the loss lives in `msdd.flow.ssdd`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msdd.config import SSDD_LATENT_FACTOR, ModelConfig, SSDDConfig
from msdd.models.layers import Stream, attention
from msdd.models.rope import RopeCache
from msdd.models.linear import fp32_region
from msdd.models.timestep import TimestepEmbedder

REPA_DIM = 384  # DINOv2 ViT-S/14 feature width


def norm_groups(channels: int) -> int:
    """GroupNorm groups: the most (up to 32) that leave at least 4 channels per group."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual. With `cond_dim`, the second norm is adaptive:
    x * (1 + scale) + shift with (scale, shift) = Linear(cond) (zero-initialised)."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(c_in), c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups(c_out), c_out, eps=1e-6, affine=cond_dim is None)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as the identity (its skip path)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.ada = None
        if cond_dim is not None:
            self.ada = nn.Linear(cond_dim, 2 * c_out)
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.ada is not None:
            scale, shift = self.ada(F.silu(cond)).chunk(2, dim=-1)  # (B, C) each
            h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class SelfAttentionBlock(nn.Module):
    """A transformer block over one token stream: the modulated MMDiT stream of `layers.py` (adaLN-Zero,
    qk-LayerNorm, SwiGLU) with plain self-attention and 2D RoPE."""

    def __init__(self, width: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.stream = Stream(width, heads, mlp_hidden, modulated=True, pre_only=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v, mods = self.stream.pre(x, cond)  # each (B, heads, N, head_dim)
        return self.stream.post(x, attention(q, k, v, rope), mods)


class LatentMap(nn.Module):
    """The latent as a (B, c, R/8, R/8) map: a spatial latent as it is; tokens (B, L, C) through a learned
    linear map of all L*C values to all c*(R/8)^2 positions (full rank: it can keep every value)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        ssdd = config.ssdd
        self.side = config.image_size // SSDD_LATENT_FACTOR
        self.channels = ssdd.spatial_channels
        self.proj = None
        if not config.spatial_latent:
            n_in = config.latent_tokens * config.latent_dim
            self.proj = nn.Linear(n_in, self.channels * self.side**2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            return z  # (B, c, R/8, R/8)
        m = self.proj(z.flatten(1))  # (B, c * side^2)
        return rearrange(m, "b (c h w) -> b c h w", c=self.channels, h=self.side)


class SSDDDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        ssdd: SSDDConfig = config.ssdd
        self.config, self.image_size = config, config.image_size
        self.prediction = ssdd.prediction
        width = ssdd.width
        self.from_linear = None
        if config.uses_linear_path:  # set by init_linear_path
            self.from_linear = nn.Linear(config.latent_tokens * config.latent_dim, 3 * config.image_size ** 2)
            nn.init.zeros_(self.from_linear.weight)
            nn.init.zeros_(self.from_linear.bias)
        chans = [ssdd.base_channels * m for m in ssdd.channel_mults]
        self.latent_map = LatentMap(config)
        self.t_embed = TimestepEmbedder(width)
        self.pool = nn.Linear(ssdd.spatial_channels, width)
        self.pool_mlp = nn.Sequential(nn.SiLU(), nn.Linear(width, width))
        self.in_conv = nn.Conv2d((6 if self.from_linear is not None else 3) + ssdd.spatial_channels, chans[0], 3,
                                 padding=1)

        # down path; `skips` records the channels of every tensor pushed for the up path
        self.down = nn.ModuleList()
        skips, c = [chans[0]], chans[0]
        for i, ch in enumerate(chans):
            level = nn.ModuleList()
            for _ in range(ssdd.blocks_per_level):
                level.append(ResBlock(c, ch, width))
                c = ch
                skips.append(c)
            if i < len(chans) - 1:
                level.append(Downsample(c))
                skips.append(c)
            self.down.append(level)

        # the bottleneck's channels are the transformer width (c == width): its tokens are the residual stream
        self.mid = nn.ModuleList(SelfAttentionBlock(width, ssdd.mid_heads, ssdd.mid_mlp_hidden)
                                 for _ in range(ssdd.mid_depth))
        self.mid_grid = config.image_size // 2 ** (len(chans) - 1)
        self.rope = RopeCache(self.mid_grid, 0, width // ssdd.mid_heads, "none")
        self.repa_after = max(1, ssdd.mid_depth // 2)  # REPA aligns the tokens after this many blocks
        self.repa_proj = None
        if ssdd.repa_weight > 0:
            self.repa_proj = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, REPA_DIM))

        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            level = nn.ModuleList()
            for _ in range(ssdd.blocks_per_level + 1):
                level.append(ResBlock(c + skips.pop(), chans[i], width))
                c = chans[i]
            if i > 0:
                level.append(Upsample(c))
            self.up.append(level)

        self.out_norm = nn.GroupNorm(norm_groups(c), c, eps=1e-6)
        self.out_conv = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        # channels-last (NHWC) convolutions: oneDNN's forward and backward run faster on the CPU in this layout
        # (benchmarks/README.md, "Training step"), and it is the layout cuDNN prefers for bf16
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity (B, 3, R, R) for noisy images x at times t (B,) given latents z."""
        if self.prediction == "v":
            return self.network(x, t, z)
        x_hat = self.end_estimate(x, t, z)
        return (x.float() - x_hat) / t.float().clamp_min(1e-4).view(-1, 1, 1, 1)

    def end_estimate(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, return_features: bool = False):
        """x-prediction: the image estimate (fp32), network output + x_lin; with `return_features` also
        the REPA features (see `network`)."""
        out, feats = self.network(x, t, z, return_features=True) if return_features else (self.network(x, t, z), None)
        x_hat = out.float() + (self.linear_image(z) if self.from_linear is not None else 0)
        return (x_hat, feats) if return_features else x_hat

    def linear_image(self, z: torch.Tensor) -> torch.Tensor:
        """x_lin = from_linear(z) (B, 3, R, R) in fp32."""
        with fp32_region(z.device):
            return self.from_linear(z.float().flatten(1)).view(-1, 3, self.image_size, self.image_size)

    def network(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, return_features: bool = False):
        """The U-Net's output (B, 3, R, R) for noisy images x at times t (B,) given latents z: the velocity
        (prediction v) or the image minus x_lin (prediction x); with `return_features`, also the REPA
        projection of the bottleneck tokens (B, grid^2, REPA_DIM)."""
        r = x.shape[-1]
        x = x.contiguous(memory_format=torch.channels_last)
        m = self.latent_map(z)  # (B, c, R/8, R/8)
        cond = self.t_embed(t) + self.pool_mlp(self.pool(rearrange(m, "b c h w -> b h w c")).mean(dim=(1, 2)))
        inputs = [x.to(m.dtype)]
        if self.from_linear is not None:
            inputs.append(self.linear_image(z).to(m.dtype).contiguous(memory_format=torch.channels_last))
        h = self.in_conv(torch.cat([*inputs, F.interpolate(m, size=(r, r), mode="nearest")], dim=1))
        hs = [h]
        for level in self.down:
            for block in level:
                h = block(h, cond) if isinstance(block, ResBlock) else block(h)
                hs.append(h)

        grid = h.shape[-1]
        tokens = rearrange(h, "b c h w -> b (h w) c")  # (B, grid^2, width)
        rope = self.rope(grid, x.device)
        feats = None
        for i, block in enumerate(self.mid):
            tokens = block(tokens, cond, rope)
            if return_features and i + 1 == self.repa_after:
                if self.repa_proj is None:
                    raise ValueError("this decoder has no REPA projection (model.ssdd.repa_weight is 0)")
                feats = self.repa_proj(tokens)
        h = rearrange(tokens, "b (h w) c -> b c h w", h=grid)

        for level in self.up:
            for block in level:
                h = block(torch.cat([h, hs.pop()], dim=1), cond) if isinstance(block, ResBlock) else block(h)
        v = self.out_conv(F.silu(self.out_norm(h)))
        return (v, feats) if return_features else v


class SpatialEncoder(nn.Module):
    """Convolutional f8 encoder (the KL-VAE / SSDD layout, without the KL term): 4 levels of ResBlocks
    with a stride-2 conv between levels, then GroupNorm, SiLU and a 3x3 conv to `spatial_channels`.
    (B, 3, R, R) in [-1, 1] -> z (B, c, R/8, R/8)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        ssdd = config.ssdd
        chans = list(ssdd.encoder_channels)
        self.in_conv = nn.Conv2d(3, chans[0], 3, padding=1)
        layers, c = [], chans[0]
        for i, ch in enumerate(chans):
            for _ in range(ssdd.blocks_per_level):
                layers.append(ResBlock(c, ch))
                c = ch
            if i < len(chans) - 1:
                layers.append(Downsample(c))
        self.blocks = nn.Sequential(*layers)
        self.out_norm = nn.GroupNorm(norm_groups(c), c, eps=1e-6)
        self.out_conv = nn.Conv2d(c, ssdd.spatial_channels, 3, padding=1)
        self.to(memory_format=torch.channels_last)  # as SSDDDecoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.in_conv(images.contiguous(memory_format=torch.channels_last)))
        return self.out_conv(F.silu(self.out_norm(h)))
