"""Users' own images: a folder (searched recursively, following links, skipping hidden folders such as .git and
.ipynb_checkpoints) of JPEG/PNG/WebP/BMP/GIF/TIFF/PPM files. A GIF or WebP animation gives its first frame,
transparent areas are composited on white, and ICC profiles are not applied (`msdd.data.images.load_image`).

Real folders hold a few broken, truncated or tiny files, and one of them must not kill a week-long
run. So an item is a record `(tensor or None, path, reason or None)`: the dataset never raises for
a bad file, and `collate_skip_bad` drops bad records and reports them. Counting happens in the
collate function because it returns to the main process; a counter inside the dataset would be
lost in DataLoader worker processes.
"""

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from msdd.data.images import BadImageError, center_crop_arr, load_image, random_crop_arr, to_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

Record = tuple[torch.Tensor | None, str, str | None]  # (image (3, R, R) or None, path, why skipped)


def list_images(root: str | Path) -> list[Path]:
    """Every image file under `root`, recursively (into linked folders too, each real folder once; not into hidden
    ones), in sorted (hence reproducible) order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    paths, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [Path(folder, f) for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    paths = sorted(p for p in paths if p.is_file())
    if not paths:
        raise ValueError(
            f"no images found in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, "
            "any letter case); point it at a folder of images or use the embedded dataset"
        )
    return paths


class ImageFolderDataset(Dataset):
    """Square `resolution` crops of the images under `root`, as `Record`s.

    train: ADM random crop (80-100% of the shorter side) + horizontal flip, a pure function of
    (seed, epoch, index). eval: centre crop, no randomness. Images with a shorter side below
    `min_size` (default resolution // 2) are skipped as too small; those between `min_size` and
    `resolution` are upscaled. `limit` keeps only the first `limit` files.
    """

    def __init__(
        self, root: str | Path, resolution: int, train: bool, seed: int = 0,
        min_size: int | None = None, limit: int | None = None,
    ):  # fmt: skip
        self.root = Path(root)
        self.paths = list_images(root)[:limit]
        self.resolution, self.train, self.seed = resolution, train, seed
        self.min_size = resolution // 2 if min_size is None else min_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Record:
        path = str(self.paths[i])
        try:
            arr = load_image(path)
        except BadImageError as e:
            return None, path, e.reason
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        return crop_record(arr, path, self.resolution, self.min_size, rng)


def too_small(arr: np.ndarray, min_size: int) -> str | None:
    """Why a decoded image is too small to train on (its shorter side below `min_size`), or None."""
    h, w = arr.shape[:2]
    return f"too small ({w}x{h}; the shorter side must be >= min_size={min_size})" if min(h, w) < min_size else None


def crop_record(arr: np.ndarray, name: str, resolution: int, min_size: int, rng: np.random.Generator | None) -> Record:
    """A decoded image as a `Record`: too small -> skipped; rng -> ADM random crop + flip, else centre crop."""
    if (reason := too_small(arr, min_size)) is not None:
        return None, name, reason
    if rng is None:
        return to_tensor(center_crop_arr(arr, resolution)), name, None
    x = to_tensor(random_crop_arr(arr, resolution, rng))
    return (x.flip(-1) if rng.random() < 0.5 else x), name, None


def collate_skip_bad(batch: list[Record]) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
    """Stack the good images (B', 3, R, R); also return how many were skipped and (path, reason) for each.

    If every record in the batch is bad the tensor is empty (0 rows): check `len(x)` before a step.
    """
    good = [x for x, _, _ in batch if x is not None]
    skipped = [(path, reason) for x, path, reason in batch if x is None]
    return (torch.stack(good) if good else torch.empty(0)), len(skipped), skipped


class SkipCounter:
    """A training loop's running tally of skipped files (a file drawn again in a later epoch counts again), with
    the distinct files; warns for the first few files so they are seen early."""

    KEEP = 10  # (path, reason) examples kept for the summary, one per file
    WARN = 5  # files that get their own warning

    def __init__(self):
        self.count = 0
        self.examples: list[tuple[str, str]] = []
        self.files: set[str] = set()

    def update(self, n: int, items: list[tuple[str, str]]) -> None:
        """Add `n` skips; `items` are their (path, reason) pairs, as `collate_skip_bad` returns them."""
        for path, reason in items:
            if path not in self.files:
                self.files.add(path)
                if len(self.files) <= self.WARN:
                    warnings.warn(f"skipping image {path}: {reason}", stacklevel=2)
                if len(self.examples) < self.KEEP:
                    self.examples.append((path, reason))
        self.count += n

    @classmethod
    def combined(cls, counters: list["SkipCounter"]) -> "SkipCounter":
        """One counter for several (e.g. one per training process), without repeating warnings."""
        out = cls()
        out.count = sum(c.count for c in counters)
        out.files = set().union(*(c.files for c in counters))
        out.examples = list(dict(e for c in counters for e in c.examples).items())[: cls.KEEP]
        return out

    def summary(self) -> str:
        if not self.count:
            return "no images skipped"
        shown = "; ".join(f"{path} ({reason})" for path, reason in self.examples)
        return (f"skipped {self.count} images, {len(self.files)} distinct files (a file counts each time it is "
                f"drawn; first {len(self.examples)}: {shown})")
