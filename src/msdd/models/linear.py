"""PCA: the best linear code of a given size, as a baseline and as the start of the linear path.

`fit_pca(x, k)` fits the top-k principal components of flattened images. Two uses:

* the baseline every report names beside the tokenizer: `pca_reconstruct` with as many components as
  the latent has floats (reconstruction = mean + projection onto the span of the components);
* the tokenizer's optional linear path (`model.linear_path`): the encoder adds the whitened PCA
  coefficients of the image to its latent, z = P x + z_net (z_net starts at zero), and the decoder maps
  z back linearly, x_lin = D z, and refines x_lin instead of inventing the image from nothing. P and D
  are ordinary trainable linear layers that `init_linear_path` sets from the fit, so a fresh tokenizer
  starts out as exactly this PCA code and training only has to learn what a linear code misses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PCA:
    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (K, D), orthonormal rows, by decreasing variance
    variance: torch.Tensor  # (K,) variance of each coefficient over the fitted data


@torch.no_grad()
def fit_pca(x: torch.Tensor, k: int, seed: int = 0) -> PCA:
    """Top-k principal components of x (N, ...) flattened to (N, D).

    Exact when the smaller side is at most 4096: with more samples than values, from the eigendecomposition of the
    D x D scatter matrix in float32 (faster than the float64 SVD of the crops, with the same reconstruction error to
    8 digits; benchmarks/README.md, "tiny-64: making the tokenizer reconstruct (issue 12)"), else the float64 SVD of
    the crops; above 4096 a randomised SVD (Halko et al.) with 64 extra columns and 6 power iterations, seeded, so the
    fit is a pure function of (x, k, seed)."""
    n, d = x.shape[0], x[0].numel()
    if k > min(n, d):
        raise ValueError(f"PCA with {k} components needs at least {k} samples of at least {k} values, got {n} x {d}")
    exact = min(n, d) <= 4096
    x = x.reshape(n, d).to(torch.float64 if exact else torch.float32)  # float32 keeps 10,000 crops at 0.5 GB
    mean = x.mean(0)
    xc = x - mean
    if exact and n > d:  # x^T x's eigenvalues are the squared singular values, its eigenvectors the components
        scatter = xc.float().T @ xc.float()  # float32: the same reconstruction error (docstring)
        values, vectors = torch.linalg.eigh(scatter)  # ascending
        s, vh = values.flip(0)[:k].clamp_min(0).sqrt(), vectors.flip(1)[:, :k].T
    elif exact:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        s, vh = s[:k], vh[:k]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, s, v = torch.svd_lowrank(xc, q=min(k + 64, n, d), niter=6)
        s, vh = s[:k], v[:, :k].T
    return PCA(mean.float(), vh.float().contiguous(), (s.pow(2) / max(n - 1, 1)).float())


@torch.no_grad()
def pca_reconstruct(pca: PCA, x: torch.Tensor) -> torch.Tensor:
    """Project x (N, ...) onto the components and back; same shape as x."""
    flat = x.reshape(x.shape[0], -1).float()
    coeff = (flat - pca.mean) @ pca.components.T
    return (coeff @ pca.components + pca.mean).reshape(x.shape)


@torch.no_grad()
def init_linear_path(encode: nn.Linear, decode: nn.Linear, pca: PCA) -> None:
    """Set the linear path from a fit: encode(x) = whitened coefficients (unit variance each),
    decode(z) = mean + z * std @ components, so decode(encode(x)) is the PCA reconstruction."""
    if encode.weight.shape != pca.components.shape:
        raise ValueError(f"the linear path has {tuple(encode.weight.shape)} weights, the PCA fit "
                         f"{tuple(pca.components.shape)}: fit as many components as the latent has floats")
    std = pca.variance.clamp_min(1e-12).sqrt()
    encode.weight.copy_(pca.components / std[:, None])
    encode.bias.copy_(-(pca.components @ pca.mean) / std)
    decode.weight.copy_((pca.components * std[:, None]).T)
    decode.bias.copy_(pca.mean)


def fp32_region(device: torch.device):
    """Autocast off on `device` (the linear path runs in fp32); a no-op where autocast does not exist
    (e.g. the meta tensors of FLOP counting)."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class Refiner(nn.Module):
    """x + f(x) for images (B, 3, H, W): a 3x3 conv to `width` channels, `blocks` residual blocks
    (conv, GELU, conv), GELU and a 3x3 conv back to 3 channels that starts at zero (f = 0 at first).
    Convolutions only, so one set of weights serves every stage's resolution."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(blocks)
        )
        self.out = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return x + self.out(F.gelu(h)).float()  # the residual in the autocast dtype, the sum in x's
