"""The Stable Diffusion v1 VAE decoder as a contender (diffusers `AutoencoderKL`, random weights): its
config and its decode."""

from __future__ import annotations

import torch

from msdd.eval.bench.models import Contender, compile_module
from msdd.eval.flops import count_flops
from msdd.models.precision import cast_weights

NO_DIFFUSERS = "diffusers not installed: pip install 'msdd[bench]'"
# Stable Diffusion v1 VAE (the f8c4 `AutoencoderKL`); sample_size is set to the benchmark resolution.
SD_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def sd_vae_contender(resolution: int, batch_size: int, device: torch.device, compile: bool = False,
                     weights: torch.dtype | None = None) -> Contender:
    """The SD v1 VAE decoder (random weights) decoding latents (B, 4, R/8, R/8) with `.decode(z).sample`."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return Contender("sd-vae", None, error=NO_DIFFUSERS)
    if resolution % 8:
        return Contender("sd-vae", None, error=f"resolution {resolution} is not a multiple of 8")
    h = resolution // 8
    with torch.device(device):
        vae = cast_weights(AutoencoderKL(**SD_VAE_CONFIG, sample_size=resolution).eval(), weights)
    if compile:
        vae.decoder = compile_module(vae.decoder, device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch_size, 4, h, h, generator=g).to(device)  # (B, 4, R/8, R/8)

    def decode_latents(latents: torch.Tensor):
        return vae.decode(latents).sample

    def decode():
        return decode_latents(z)

    with torch.device("meta"):  # shapes only
        shape_only = AutoencoderKL(**SD_VAE_CONFIG, sample_size=resolution)
    flops = count_flops(lambda x: shape_only.decode(x).sample, torch.zeros(1, 4, h, h, device="meta"))
    params = sum(p.numel() for m in (shape_only.post_quant_conv, shape_only.decoder) for p in m.parameters())
    return Contender("sd-vae", decode, flops, {"latent": [4, h, h], "passes_per_image": 1, "params_M": params / 1e6},
                     decode_latents=decode_latents, latent_shape=(4, h, h))
