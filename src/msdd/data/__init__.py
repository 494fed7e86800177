"""Images in, (B, 3, R, R) tensors in [-1, 1] out.

`data.source` is "embedded" (photos shipped inside scikit-image/scikit-learn, no download), a
folder of the user's own images, or WebDataset tar shards. All training datasets yield the same record,
`(tensor or None, name, skip reason or None)`, batched by `collate_skip_bad`, so the training loop
has one code path.
"""

from pathlib import Path

import torch

from msdd.data.embedded import (
    EPOCH_LENGTH, HELDOUT_PHOTOS, TRAIN_PHOTOS, EmbeddedCrops, embedded_eval_set, load_photo,
)  # fmt: skip
from msdd.data.folder import (
    IMAGE_EXTENSIONS, ImageFolderDataset, SkipCounter, collate_skip_bad, list_images, too_small,
)  # fmt: skip
from msdd.data.shards import TarShardDataset, is_shard_source
from msdd.data.images import (
    BadImageError, center_crop_arr, load_image, random_crop_arr, to_tensor, to_uint8,
)  # fmt: skip

__all__ = [
    "BadImageError", "EmbeddedCrops", "HELDOUT_PHOTOS", "IMAGE_EXTENSIONS", "ImageFolderDataset",
    "SkipCounter", "TRAIN_PHOTOS", "TarShardDataset", "build_eval_images", "build_train_dataset", "center_crop_arr",
    "check_source", "collate_skip_bad", "embedded_eval_set", "list_images", "load_image", "load_photo",
    "random_crop_arr", "to_tensor", "to_uint8",
]  # fmt: skip


def _not_a_source(source: str, option: str) -> ValueError:
    return ValueError(
        f"{option}={source!r} is neither 'embedded', nor an existing folder (alone or as embedded+FOLDER), nor "
        f"tar shards (*.tar); set {option} to 'embedded', to a folder of images or to shards like "
        "/data/train-{000000..000099}.tar"
    )


def check_source(source: str, option: str = "data.source") -> str:
    """`source` if it names training data of a kind `build_train_dataset` reads, else an error naming `option`."""
    folder = source[len("embedded+"):] if source.startswith("embedded+") else source
    if source != "embedded" and not is_shard_source(source) and not Path(folder).is_dir():
        raise _not_a_source(source, option)
    return source


def _folder(source: str) -> Path:
    if not Path(source).is_dir():
        raise _not_a_source(source, "data.source")
    return Path(source)


def extra_photos(folder: str, resolution: int) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """(the usable photographs of `folder`, searched recursively, for data.source=embedded+FOLDER; the others as
    (path, reason)). They are cropped at random scales like the embedded photos; a photograph whose shorter side
    is below resolution / 2 is left out as too small, as in a folder source."""
    paths, bad = [], []
    for path in list_images(_folder(folder)):
        try:
            reason = too_small(load_photo(str(path)), resolution // 2)
        except BadImageError as e:
            reason = e.reason
        if reason is None:
            paths.append(str(path))
        else:
            bad.append((str(path), reason))
    if not paths:
        raise ValueError(f"data.source=embedded+{folder}: no usable photograph in {folder}"
                         + (f", e.g. {bad[0][0]}: {bad[0][1]}" if bad else ""))
    return tuple(paths), bad


def build_train_dataset(
    source: str, resolution: int, seed: int, limit: int | None = None, rank: int = 0, world_size: int = 1
) -> EmbeddedCrops | ImageFolderDataset | TarShardDataset:
    """The training dataset for `data.source`; `limit` caps the items per epoch (for quick runs).
    Map-style datasets are split over processes by the sampler, tar shards by the dataset itself."""
    if source == "embedded":
        return EmbeddedCrops(resolution, length=limit or EPOCH_LENGTH, seed=seed)
    if source.startswith("embedded+"):
        photos, left_out = extra_photos(source[len("embedded+"):], resolution)
        dataset = EmbeddedCrops(resolution, length=limit or EPOCH_LENGTH, seed=seed, photos=TRAIN_PHOTOS + photos)
        dataset.left_out = left_out  # reported once by the training loop (never drawn, so never skipped)
        return dataset
    if is_shard_source(source):
        return TarShardDataset(source, resolution, seed=seed, rank=rank, world_size=world_size, limit=limit)
    return ImageFolderDataset(_folder(source), resolution, train=True, seed=seed, limit=limit)


def build_eval_images(
    source: str, resolution: int, limit: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Fixed evaluation images (N, 3, R, R) in [-1, 1] and their names; bad files skipped with a warning."""
    if source == "embedded":
        images, names = embedded_eval_set(resolution)
        return images[:limit], names[:limit]
    if is_shard_source(source):
        raise ValueError(f"data.eval_source={source!r}: evaluation images come from 'embedded' or a folder, "
                         "not tar shards")
    dataset = ImageFolderDataset(_folder(source), resolution, train=False, limit=limit)
    records = [dataset[i] for i in range(len(dataset))]
    x, n_skipped, skipped = collate_skip_bad(records)
    SkipCounter().update(n_skipped, skipped)
    if not len(x):
        path, reason = skipped[0]
        raise ValueError(f"none of the {n_skipped} images in {source} is usable, e.g. {path}: {reason}")
    names = [str(Path(path).relative_to(dataset.root)) for image, path, _ in records if image is not None]
    return x, names
