"""Baselines at the latent's float count, named in every report (SPEC 12).

    bicubic   down to the largest 3 x s x s image with at most as many floats, bicubic back up
              (msdd.eval.metrics.bicubic_baseline)
    PCA       the best linear code: as many principal components as the latent has floats, fitted on
              training crops of the same data source the model trains on (`pca_for_source`, cached)

The PCA fit is cached under $MSDD_CACHE (default ~/.cache/msdd) by (source, resolution, components,
crops, seed); a folder source is keyed by its path, so delete the cache after changing its contents.
The number of crops is 20,000 (SPEC 12), or $MSDD_PCA_CROPS (the tests use a few hundred); reports
state the number they used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from msdd.models.linear import PCA, fit_pca, pca_reconstruct

DEFAULT_PCA_CROPS = 20_000


def default_pca_crops() -> int:
    return int(os.environ.get("MSDD_PCA_CROPS", DEFAULT_PCA_CROPS))


def training_crops(source: str, resolution: int, n: int, seed: int = 0, batch_size: int = 256,
                   max_epochs: int = 100) -> torch.Tensor:
    """Up to `n` training crops (N, 3, R, R) in [-1, 1] of `source`, drawn by the training data pipeline
    (random crops and flips, bad images skipped) with `seed`. Data with fewer than `n` images is passed
    over again (new random crops each epoch), up to `max_epochs` times."""
    from msdd.data import build_train_dataset, collate_skip_bad

    full = build_train_dataset(source, resolution, seed, limit=None if not source.startswith("embedded") else max(n, 1))
    out, count, skipped = [], 0, []
    g = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        full.set_epoch(epoch)
        dataset = full if isinstance(full, IterableDataset) else \
            torch.utils.data.Subset(full, torch.randperm(len(full), generator=g)[: n - count].tolist())
        for images, _, bad in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_bad):
            skipped = skipped or bad[:1]  # the first file skipped, for the error below
            out.append(images)
            count += len(images)
            if count >= n:
                return torch.cat(out)[:n]
        if count == 0:
            break
    if count == 0:
        why = (f"every sample was skipped, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else
               "it holds no samples (empty or unreadable shards, or an empty folder)")
        raise ValueError(f"data.source={source!r} yielded no usable training image to fit the PCA on: {why}")
    return torch.cat(out)[:n]


def cache_dir() -> Path:
    return Path(os.environ.get("MSDD_CACHE", Path.home() / ".cache" / "msdd"))


def pca_for_source(source: str, resolution: int, components: int, crops: int | None = None,
                   seed: int = 0, cache: bool = True) -> PCA:
    """The PCA baseline's fit for a data source (cached; see the module docstring)."""
    crops = default_pca_crops() if crops is None else crops
    from safetensors.torch import load_file, save_file

    key = f"{Path(source).resolve() if source != 'embedded' else source}|{resolution}|{components}|{crops}|{seed}"
    path = cache_dir() / f"pca-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if cache and path.is_file():
        t = load_file(str(path))
        return PCA(t["mean"], t["components"], t["variance"])
    pca = fit_pca(training_crops(source, resolution, crops, seed), components, seed)
    if cache:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"mean": pca.mean, "components": pca.components, "variance": pca.variance}, str(tmp),
                      metadata={"key": key})
            os.replace(tmp, path)
        except OSError as e:  # a read-only home: the fit is used all the same, only not kept
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            warnings.warn(f"the PCA baseline's fit was not cached ({path.parent}: {e.strerror or e}); set MSDD_CACHE "
                          "to a writable folder to keep it for the next run", stacklevel=2)
    return pca


def pca_baseline(pca: PCA, images: torch.Tensor) -> torch.Tensor:
    """The PCA code's reconstruction of images (N, 3, R, R) in [-1, 1], rounded to 8 bits like every
    reconstruction a report scores; on the images' device."""
    from msdd.eval.metrics import quantize

    return quantize(pca_reconstruct(pca, images.cpu()).clamp(-1, 1)).to(images.device)
