"""The generator's training data: a tokenizer's normalised latents of `data.images` training images, encoded
once before training (each image also mirrored with `data.flip`), with class labels read from class
subfolders; and `LatentRecords`, the shared training loop's view of them.

Images come as `msdd train` takes them (`msdd.data.build_train_dataset`): random crops of the embedded
photos (`embedded`, `embedded+FOLDER`), or ADM crops of a folder's files (a seeded random subset of
`data.images` files). A class-conditional generator needs a folder in the ImageNet layout,
FOLDER/CLASS/image.jpg; the classes are the sorted subfolder names.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from msdd.data import SkipCounter, build_train_dataset, list_images
from msdd.data.shards import is_shard_source
from msdd.dist import all_gather_object
from msdd.generator.config import GenDataConfig


class EncodedLatents(NamedTuple):
    latents: torch.Tensor  # (N, *latent_shape), normalised
    labels: torch.Tensor | None  # (N,) class indices, or None (unconditional)
    class_names: list[str]


def class_names_of(folder: str | Path, num_classes: int) -> list[str]:
    """The class subfolders of `folder` (sorted), checked against `generator.num_classes`."""
    root = Path(folder)
    parts = [p.relative_to(root).parts for p in list_images(root)]
    loose = [Path(*q) for q in parts if len(q) == 1]
    if loose:
        raise ValueError(f"generator.num_classes={num_classes} reads class labels from subfolders, but {root} has "
                         f"images outside any subfolder, e.g. {loose[0]}; arrange it as {root}/CLASS/image.jpg, or "
                         "set generator.num_classes=0 for an unconditional generator")
    names = sorted({q[0] for q in parts})
    if len(names) != num_classes:
        raise ValueError(f"generator.num_classes={num_classes}, but {root} has {len(names)} class subfolders "
                         f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); set "
                         f"generator.num_classes={len(names)}")
    return names


def image_records(data: GenDataConfig, resolution: int, seed: int) -> Dataset:
    """Training records `(image or None, name, reason)` of `data.source`: at most `data.images` of them."""
    if is_shard_source(data.source):
        raise ValueError(f"data.source={data.source!r}: gen-train encodes 'embedded', 'embedded+FOLDER' or a folder "
                         "of images, not tar shards")
    embedded = data.source.startswith("embedded")  # crops drawn afresh: ask for `images` of them
    dataset = build_train_dataset(data.source, resolution, seed, limit=data.images if embedded else None)
    if len(dataset) > data.images:  # a folder: a seeded random subset of its files
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = Subset(dataset, sorted(order[: data.images].tolist()))
    return dataset


@torch.no_grad()
def encode_latents(tokenizer, data: GenDataConfig, seed: int, num_classes: int = 0, bf16: bool = False,
                   batch_size: int = 64, rank: int = 0, world: int = 1) -> EncodedLatents:
    """The normalised latents of the training images of `data` (module docstring), in the order read, each
    image's mirrored copy after its batch; labels when `num_classes` > 0.

    Under several processes (`rank` of `world`, a process group started) each process encodes every
    `world`-th batch and all of them get the whole set, in the same order as one process would."""
    if num_classes and data.source.startswith("embedded"):
        raise ValueError(f"generator.num_classes={num_classes}: the embedded photos have no classes; set "
                         "data.source to a folder with one subfolder per class, or generator.num_classes=0")
    classes = class_names_of(data.source, num_classes) if num_classes else []
    index = {name: i for i, name in enumerate(classes)}
    dataset = image_records(data, tokenizer.config.image_size, seed)
    batches = [range(i, min(i + batch_size, len(dataset))) for i in range(0, len(dataset), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches[rank::world], collate_fn=list, num_workers=data.num_workers)
    skips, encoded = SkipCounter(), []  # encoded: (latents, labels) of each of this process's batches
    for records in loader:
        skipped = [(name, reason) for x, name, reason in records if x is None]
        skips.update(len(skipped), skipped)
        good = [(x, name) for x, name, _ in records if x is not None]
        if not good:
            encoded.append((None, []))
            continue
        x = torch.stack([x for x, _ in good]).to(tokenizer.device)  # (B, 3, R, R)
        y = [index[Path(name).relative_to(data.source).parts[0]] for _, name in good] if classes else []
        views = (x, x.flip(-1)) if data.flip else (x,)
        z = torch.cat([tokenizer.normalize_latents(tokenizer.encode(view, bf16=bf16)).cpu() for view in views])
        encoded.append((z, y * len(views)))
    shares = all_gather_object((encoded, skips))  # [(encoded, skips) of rank 0, of rank 1, ...]
    skips = SkipCounter.combined([s for _, s in shares])
    left_out = getattr(dataset, "left_out", [])  # embedded+FOLDER's unusable photos
    skips.update(len(left_out), left_out)
    in_order = [shares[b % world][0][b // world] for b in range(len(batches))]
    latents = [z for z, _ in in_order if z is not None]
    if not latents:
        raise ValueError(f"data.source={data.source}: not one usable image to encode ({skips.summary()})")
    labels = torch.tensor([y for _, ys in in_order for y in ys]) if classes else None
    return EncodedLatents(torch.cat(latents), labels, classes)


class LatentRecords(Dataset):
    """Record i is `(i, "latent:i", None)`: the shared loop's batches are then row indices into the
    encoded latents, so that a latent and its label travel together (`collate_skip_bad` stacks them)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, None]:
        return torch.tensor(i), f"latent:{i}", None
