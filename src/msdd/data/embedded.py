"""The default dataset: real colour photographs that ship inside the scikit-image and scikit-learn wheels.

Nothing is downloaded, so `msdd train` works on a fresh offline machine. Ten photos are few, so
training sees random crops at random scales (a 64 px crop of a 1411 px retina is a very different
image from the whole retina shrunk to 64 px). Three photos are held out for evaluation only.
Neither list holds a near-duplicate of the other: skimage's `cat` is `chelsea`, and the right view
of `stereo_motorcycle` is almost its left view, so both are left out.
"""

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from msdd.data.images import center_crop_arr, load_image, to_tensor

TRAIN_PHOTOS = (
    "coffee", "astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
    "china",
)  # fmt: skip
HELDOUT_PHOTOS = ("chelsea", "rocket", "flower")
_SKLEARN_PHOTOS = ("china", "flower")
EPOCH_LENGTH = 10_000  # items per "epoch" of EmbeddedCrops: crops are drawn afresh, so any number works


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One embedded photo as a read-only uint8 (H, W, 3) array, decoded once per process."""
    # Imported here: both libraries are slow to import and only this function needs them.
    import skimage.data
    from sklearn.datasets import load_sample_image

    if name not in TRAIN_PHOTOS + HELDOUT_PHOTOS:
        if Path(name).is_file():  # an extra photograph (data.source=embedded+FOLDER)
            arr = load_image(name)
            arr.setflags(write=False)
            return arr
        raise ValueError(f"unknown embedded photo {name!r}; choose from {TRAIN_PHOTOS + HELDOUT_PHOTOS}")
    if name in _SKLEARN_PHOTOS:
        arr = load_sample_image(f"{name}.jpg")
    elif name == "stereo_motorcycle":
        arr = skimage.data.stereo_motorcycle()[0]  # left view only: the right one nearly duplicates it
    else:
        arr = getattr(skimage.data, name)()
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    arr.setflags(write=False)  # shared by every caller in the process
    return arr


@functools.lru_cache(maxsize=None)
def _pyramid(name: str) -> tuple[torch.Tensor, ...]:
    """uint8 (3, H/2^k, W/2^k) for k = 0, 1, ...: exact 2x area halvings down to a few pixels."""
    level = torch.from_numpy(np.array(load_photo(name))).permute(2, 0, 1).contiguous()  # (3, H, W)
    levels = [level]
    while min(level.shape[1:]) >= 4:
        level = F.avg_pool2d(level[None].float(), 2)[0].round().to(torch.uint8)  # (3, H/2, W/2)
        levels.append(level)
    return tuple(levels)


class EmbeddedCrops(Dataset):
    """Random square crops of the training photos at random scales, resized to `resolution`.

    A crop of side c (log-uniform between `resolution` and the photo's shorter side) is cut from the
    pyramid level where it is smallest but still >= `resolution`, so resizing touches at most
    (2 * resolution)^2 pixels: a few ms per batch at 64 px. Item i of epoch e is a pure function of
    (seed, e, i), the same in every worker process and after a resume.
    Items are (tensor (3, R, R) in [-1, 1], "embedded:<photo>", None), the folder dataset's record.
    """

    def __init__(
        self, resolution: int, length: int = EPOCH_LENGTH, seed: int = 0, photos: tuple[str, ...] = TRAIN_PHOTOS
    ):
        self.resolution, self.length, self.seed, self.photos = resolution, length, seed, tuple(photos)
        self.epoch = 0
        self.pyramids = [_pyramid(name) for name in self.photos]  # built before DataLoader workers fork

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, None]:
        R = self.resolution
        rng = np.random.default_rng([self.seed, self.epoch, i])
        p = int(rng.integers(len(self.photos)))
        levels = self.pyramids[p]
        shorter = min(levels[0].shape[1:])
        side = math.exp(rng.uniform(math.log(min(R, shorter)), math.log(shorter)))  # at full size
        k = min(max(0, math.floor(math.log2(side / R))), len(levels) - 1)
        level = levels[k]
        s = min(max(R, round(side / 2**k)), *level.shape[1:])  # crop side at level k, in [R, 2R)
        top = int(rng.integers(level.shape[1] - s + 1))
        left = int(rng.integers(level.shape[2] - s + 1))
        x = level[None, :, top : top + s, left : left + s].float()  # (1, 3, s, s)
        if s != R:
            x = F.interpolate(x, size=(R, R), mode="bilinear", antialias=True, align_corners=False)
        if rng.random() < 0.5:
            x = x.flip(-1)
        x = (x[0] / 127.5 - 1.0).clamp(-1, 1)  # (3, R, R); clamp: float rounding
        return x, f"embedded:{Path(self.photos[p]).name}", None


def embedded_eval_set(resolution: int, tiles: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The held-out photos as (N, 3, R, R) in [-1, 1], with names. Deterministic.

    Each photo appears whole (centre-cropped, name "chelsea") and, with `tiles`, as its centre
    square cut into 2x2 and 3x3 tiles ("chelsea_2x2_r0c1"): the tiles test fine detail at the
    scale the model is trained on, the whole photo tests global structure. 3 x (1 + 4 + 9) = 42 images.
    """
    images, names = [], []
    for name in HELDOUT_PHOTOS:
        photo = load_photo(name)
        images.append(center_crop_arr(photo, resolution))
        names.append(name)
        if not tiles:
            continue
        S = min(photo.shape[:2])
        top, left = (photo.shape[0] - S) // 2, (photo.shape[1] - S) // 2
        square = photo[top : top + S, left : left + S]
        for n in (2, 3):
            edges = [round(j * S / n) for j in range(n + 1)]
            for r in range(n):
                for c in range(n):
                    tile = square[edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
                    images.append(center_crop_arr(tile, resolution))  # tiles may differ by 1 px
                    names.append(f"{name}_{n}x{n}_r{r}c{c}")
    return torch.stack([to_tensor(a) for a in images]), names
