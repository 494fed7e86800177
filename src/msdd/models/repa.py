"""Frozen DINOv2 ViT-S/14 patch features: the target of the REPA loss of the SSDD family.

Built by timm (`vit_small_patch14_dinov2`, no download) and loaded from a weights file found by
`msdd.weights.resolve_weights("dinov2_vits14", path)`: Meta's `dinov2_vits14_pretrain.pth` or timm's
`model.safetensors`. Never built with random weights: without the file, construction fails with the
documented error naming the file and the option.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msdd.models.discriminator import IMAGENET_MEAN, IMAGENET_STD, load_timm_vit

DINOV2_INPUT = 224  # 16 x 16 patches of 14 px


class DinoV2Features(nn.Module):
    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.vit = load_timm_vit(
            "dinov2_vits14", "vit_small_patch14_dinov2", weights_path, ("mask_token", "head"), dynamic_img_size=True,
            without_timm="the REPA loss needs timm: pip install 'msdd[dino]' (or set model.ssdd.repa_weight=0)")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "DinoV2Features":
        return super().train(False)  # frozen network: always eval

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> normalised patch tokens (B, 256, 384) of the 224 px input."""
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=(DINOV2_INPUT, DINOV2_INPUT), mode="bilinear", align_corners=False, antialias=True)
        tokens = self.vit.forward_features(x)  # (B, prefix + 256, 384), after the final LayerNorm
        return tokens[:, self.vit.num_prefix_tokens :]
