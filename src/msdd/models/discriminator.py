"""Discriminators for stage-2 distillation (SPEC 7) and the hinge losses.

`dino`:  a frozen DINO ViT-S/16 (built by timm, weights from a file) whose patch-embedding tokens and
         block 2, 5, 8, 11 tokens feed one small trainable head each: spectral-normalised 1x1 conv1d
         -> GroupNorm -> LeakyReLU(0.2) -> residual spectral-normalised conv1d (kernel 9, circular
         padding) -> 1x1 conv1d to one logit per token. `distill.disc_heads=reference`: the reference
         code's heads (384 wide, BatchNorm, residual / sqrt(2), CLS added, random crops).
`patch`: a small trainable convolutional patch discriminator with spectral norm; it needs no
         pretrained weights, for offline and CPU presets.

Both map images in [-1, 1] (B, 3, H, W) to logits (B, N). Losses are computed in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from msdd.weights import load_tensor_file, resolve_weights, wrong_file

DINO_LEVELS = (2, 5, 8, 11)  # transformer blocks whose tokens are used (plus the patch embedding)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


class PatchDiscriminator(nn.Module):
    """Strided spectral-norm convolutions; one logit per receptive-field patch."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods, c_in = [], 3
        for i in range(layers):
            c_out = channels * 2**i
            mods += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in = c_out
        mods.append(spectral_norm(nn.Conv2d(c_in, 1, 3, padding=1)))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float()).flatten(1)  # (B, h*w)


class DinoHead(nn.Module):
    """One level's head. `reference=True` is the paper's reference code's head (issue 15 D7): 384 wide,
    BatchNorm (SyncBatchNorm under DDP), the residual branch scaled by 1 / sqrt(2)."""

    def __init__(self, dim: int, hidden: int = 128, reference: bool = False) -> None:
        super().__init__()
        self.inp = spectral_norm(nn.Conv1d(dim, hidden, 1))
        self.norm = nn.BatchNorm1d(hidden) if reference else nn.GroupNorm(1, hidden)
        self.res = spectral_norm(nn.Conv1d(hidden, hidden, 9, padding=4, padding_mode="circular"))
        self.out = spectral_norm(nn.Conv1d(hidden, 1, 1))
        self.res_scale = 2 ** -0.5 if reference else 1.0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm(self.inp(tokens.transpose(1, 2))), 0.2)  # (B, hidden, N)
        h = (h + F.leaky_relu(self.res(h), 0.2)) * self.res_scale
        return self.out(h).flatten(1)  # (B, N)


def random_crops(x: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image, with probability `prob`, replaced by a random square crop (side uniform in [1/2, 1] of
    the shorter side) resized back to its size; the discriminator's augmentation (issue 15 D7)."""
    out = []
    h, w = x.shape[-2:]
    for img in x:
        if torch.rand((), generator=generator).item() >= prob:
            out.append(img)
            continue
        side = int(min(h, w) * (0.5 + 0.5 * torch.rand((), generator=generator).item()))
        top = int(torch.randint(0, h - side + 1, (), generator=generator))
        left = int(torch.randint(0, w - side + 1, (), generator=generator))
        crop = img[None, :, top:top + side, left:left + side]
        out.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def load_timm_vit(name: str, arch: str, weights_path: str | Path | None, skip: tuple[str, ...], without_timm: str,
                  **create) -> nn.Module:
    """timm's `arch` (headless, frozen, eval) with the pretrained file `name` (`msdd.weights`) at `weights_path`
    or its standard places, without its keys that start with one of `skip`. A file of another network is the
    error naming the option and the file expected; `without_timm` is the ImportError's message."""
    try:
        import timm
    except ImportError:
        raise ImportError(without_timm) from None

    path = resolve_weights(name, weights_path)
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **create)
    state = {k: v for k, v in load_tensor_file(path, name).items() if not k.startswith(skip)}
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:  # keys that fit, shapes that do not
        raise wrong_file(name, path, e) from None
    if missing or unexpected:
        raise wrong_file(name, path, ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}"))
    return vit.eval().requires_grad_(False)


class DinoDiscriminator(nn.Module):
    def __init__(self, weights_path: str | Path | None = None, reference: bool = False) -> None:
        """reference: the reference code's heads (384 wide, BatchNorm, residual / sqrt(2)), the CLS token
        added to every patch token and random crops of half the images in training (issue 15 D7)."""
        super().__init__()
        self.reference = reference
        self.vit = vit = load_timm_vit(
            "dino_vits16", "vit_small_patch16_224", weights_path, ("head",), dynamic_img_size=False,
            without_timm="the DINO discriminator needs timm: pip install 'msdd[dino]' (or use "
                         "distill.discriminator=patch)")
        hidden = vit.embed_dim if reference else 128
        self.heads = nn.ModuleList(DinoHead(vit.embed_dim, hidden, reference) for _ in range(1 + len(DINO_LEVELS)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.vit.eval()  # frozen feature network
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (B, 196, 384) after the patch embedding and after blocks 2, 5, 8, 11."""
        x = ((x.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        h = self.vit._pos_embed(self.vit.patch_embed(x))  # (B, 1 + 196, 384) with the cls token first
        prefix = self.vit.num_prefix_tokens

        def patches(h: torch.Tensor) -> torch.Tensor:  # reference: the CLS token added to every patch token
            return h[:, prefix:] + h[:, :1] if self.reference else h[:, prefix:]

        feats = [patches(h)]
        for i, block in enumerate(self.vit.blocks):
            h = block(h)
            if i in DINO_LEVELS:
                feats.append(patches(h))
            if i >= DINO_LEVELS[-1]:
                break
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference and self.training:
            x = random_crops(x, 0.5)
        return torch.cat([head(f) for head, f in zip(self.heads, self.features(x))], dim=1)  # (B, 5 * 196)


def build_discriminator(kind: str, dino_weights: str | Path | None = None, reference_heads: bool = False) -> nn.Module:
    """`reference_heads` (distill.disc_heads=reference): the DINO heads of the paper's reference code; their
    BatchNorm becomes SyncBatchNorm when a process group is running (DDP)."""
    if kind == "patch":
        return PatchDiscriminator()
    if kind == "dino":
        disc = DinoDiscriminator(dino_weights, reference=reference_heads)
        if reference_heads and torch.distributed.is_available() and torch.distributed.is_initialized():
            disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        return disc
    raise ValueError(f"unknown distill.discriminator {kind!r}; expected 'dino' or 'patch'")
