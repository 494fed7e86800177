"""Quality of generated samples against data images (`msdd generate --metrics`).

- FID: Inception features of the decoded samples against those of the data images, with the rFID machinery of
  `msdd eval` (torchmetrics' FrechetInceptionDistance on the pretrained Inception file); skipped, with the
  reason, when that file is absent. With a few thousand samples it is not comparable to published FID (50,000).
- latent FD: the Frechet distance between the generator's normalised latents and the tokenizer's normalised
  latents of the data images, which needs no pretrained network; beside it the same distance for N(0, I)
  latents (what a generator that learnt nothing but the normalisation statistics would sample) and the
  floor: the distance between the data latents and those of as many other data images, what sampling
  alone leaves at this number of samples (60 at 1,024 samples of tiny-64's 256 dimensions). Needs more
  samples than latent dimensions for a full-rank covariance.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from msdd.data import to_uint8
from msdd.generator.config import GenDataConfig
from msdd.generator.data import image_records


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two sets of vectors (N, D), in float64; the
    trace of the square root is the sum of the square roots of the eigenvalues of S_a S_b."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eig = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eig.sqrt().sum())


@torch.no_grad()
def data_images(source: str, n: int, resolution: int, seed: int) -> torch.Tensor:
    """`n` data images (n, 3, R, R) in [-1, 1] as `msdd gen-train` reads them (random crops of the embedded
    photos, or a seeded subset of a folder's files); fewer if the source has fewer usable ones."""
    records = image_records(GenDataConfig(source=source, images=n), resolution, seed)
    images = [x for batch in DataLoader(records, batch_size=64, collate_fn=list) for x, _, _ in batch
              if x is not None]
    if not images:
        raise ValueError(f"--data {source}: no usable image to compare the samples with")
    return torch.stack(images[:n])


def normalised_latents(tokenizer, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([tokenizer.normalize_latents(tokenizer.encode(images[i:i + 64].to(tokenizer.device))).cpu()
                      for i in range(0, len(images), 64)])


def sample_metrics(samples: torch.Tensor, latents: torch.Tensor, tokenizer, data: torch.Tensor,
                   other_data: torch.Tensor, generator: torch.Generator, inception_weights=None) -> dict:
    """FID (or the reason it is skipped) and latent FD of decoded `samples` (n, 3, R, R) with their normalised
    `latents` (n, ...) against data images `data` (m, 3, R, R); `other_data`, as many other data images, gives
    the floor; `generator` draws the N(0, I) baseline."""
    data_latents = normalised_latents(tokenizer, data)
    noise = torch.randn(latents.shape, generator=generator)
    out = {"samples": len(samples), "data_images": len(data), "latent_dims": latents[0].numel(),
           "latent_fd": frechet_distance(latents.cpu(), data_latents),
           "latent_fd_gaussian_baseline": frechet_distance(noise, data_latents),
           "latent_fd_data_floor": frechet_distance(normalised_latents(tokenizer, other_data), data_latents)}
    fid = fid_against(samples, data, inception_weights)
    out["fid" if isinstance(fid, float) else "fid_skipped"] = fid
    return out


@torch.no_grad()
def fid_against(samples: torch.Tensor, data: torch.Tensor, inception_weights=None) -> float | str:
    """FID of images `samples` against images `data` (both (n, 3, R, R) in [-1, 1]) with torchmetrics' FID on
    the pretrained Inception file, or the reason it is skipped (a str) when that file does not resolve."""
    from msdd.eval.evaluate import build_fid

    fid, reason = build_fid(inception_weights, samples.device)
    if fid is None:
        return reason
    for i in range(0, len(data), 64):
        fid.update(to_uint8(data[i:i + 64].to(samples.device)), real=True)
    for i in range(0, len(samples), 64):
        fid.update(to_uint8(samples[i:i + 64]), real=False)
    return float(fid.compute())
