"""Shared fixtures: tiny configs (a few channels, 32 px) and a small folder of real photo crops.

Tests over ~10 s on 2 CPU cores (torchrun subprocesses, SSDD training and distillation) are marked `slow`
(declared in pyproject.toml); `pytest -m "not slow"` leaves them out for a quick run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msdd.config import load_config

TINY = [
    "model.image_size=32", "model.latent_tokens=8", "model.latent_dim=4",
    "model.encoder.depth=1", "model.encoder.width=32", "model.encoder.heads=2", "model.encoder.mlp_hidden=64",
    "model.decoder.depth=2", "model.decoder.width=32", "model.decoder.heads=2", "model.decoder.mlp_hidden=64",
    "model.flow.num_stages=3", "model.sampling.steps=[2,2,2]",
    "train.batch_size=8", "train.warmup_steps=5", "train.max_steps=200", "train.log_every=5",
    "train.ckpt_every=10", "train.grid_every=1000", "train.lr=1e-3", "train.pca_crops=300",
]


def tiny_config(*extra: str, stages: int | None = None):
    over = list(TINY)
    if stages is not None:
        over += [f"model.flow.num_stages={stages}", f"model.sampling.steps={[2] * stages}"]
    return load_config("tiny-64", over + list(extra))


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(autouse=True, scope="session")
def _pca_cache(tmp_path_factory):
    """PCA baselines: a per-session cache (not the user's) and a small fit (600 crops, not 20,000)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MSDD_CACHE", str(tmp_path_factory.mktemp("msdd-cache")))
    mp.setenv("MSDD_PCA_CROPS", "600")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def photo_folder(tmp_path):
    """Six real photo crops (from the embedded photos) saved as PNG/JPEG files."""
    from msdd.data import load_photo

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["coffee", "astronaut", "china"]):
        arr = load_photo(name)
        for j, (y, x) in enumerate([(0, 0), (100, 150)]):
            crop = np.ascontiguousarray(arr[y : y + 96, x : x + 96])
            ext = "png" if j == 0 else "jpg"
            Image.fromarray(crop).save(root / ("sub" if i == 2 else ".") / f"{name}_{j}.{ext}")
    return root
