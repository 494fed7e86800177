"""LPIPS-VGG perceptual distance (Zhang et al., 2018), usable as a differentiable loss.

VGG16 ImageNet features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 are unit-normalised per
position, their squared differences weighted per channel by the learned LPIPS linear heads and
averaged over space; the five layer scores are summed. The VGG16 weights come from a file
(`msdd.weights.resolve_weights("vgg16")`); the small linear heads ship inside torchmetrics.
Never built with random weights: without the file, construction fails with the documented error.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchmetrics
from torch import nn

from msdd.weights import load_tensor_file, resolve_weights, wrong_file

_VGG_CUTS = (4, 9, 16, 23, 30)  # feature indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LPIPS(nn.Module):
    def __init__(self, vgg_weights: str | Path | None = None) -> None:
        super().__init__()
        import torchvision

        path = resolve_weights("vgg16", vgg_weights)
        vgg = torchvision.models.vgg16(weights=None)
        try:
            vgg.load_state_dict(load_tensor_file(path, "vgg16"))
        except RuntimeError as e:  # missing / unexpected keys, other shapes: another network's file
            raise wrong_file("vgg16", path, e) from None
        self.features = vgg.features[: _VGG_CUTS[-1]]
        lin_path = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        self.lins = nn.ParameterList(nn.Parameter(lin[f"lin{i}.model.1.weight"]) for i in range(5))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen network: always eval

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out, start = (x - self.shift) / self.scale, [], 0
        for cut in _VGG_CUTS:
            h = self.features[start:cut](h)
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            start = cut
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between images in [-1, 1]."""
        fx, fy = self._feats(x.float()), self._feats(y.float())
        return sum(
            nn.functional.conv2d((a - b).pow(2), w).mean(dim=(1, 2, 3)) for a, b, w in zip(fx, fy, self.lins)
        )
