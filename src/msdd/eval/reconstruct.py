"""Reconstruct images with a tokenizer: batched encode + decode with per-image noise, and unique output
names (files in, PNGs / grid / CSV out: `msdd.eval.reconstruct_files`).

Every input gets its own name (CSV row and PNG): its path relative to the folder it was found in (the file
name for a file given directly), without the extension; names that several inputs share (`A/x.png B/x.png`,
`good.png good.jpg`) are made unique from the part of the paths that tells them apart (`unique_names`).

Every image's decode noise comes from its own generator (`image_generators`), seeded from the seed and a
key of that image alone: `msdd reconstruct` uses the file's own name (its output name before
`unique_names` renames a collision), so an image's noise does not depend on `--batch-size`, on the order of
the inputs or on the other files in the folder; two inputs of the same name (`A/x.png`, `B/x.png` given
as files) draw the same noise. What remains is float rounding: a batch of
several images goes through the network's matrix products in another order than a batch of one, which
moves a rare pixel by one level of 255 (about 1 value in 12,288 at 64 px); with `--batch-size 1` the
results are bit-identical whatever the other inputs.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from msdd.eval.metrics import quantize
from msdd.seeding import image_generators
from msdd.tokenizer import Tokenizer, synchronize


@torch.no_grad()
def reconstruct_images(
    tok: Tokenizer,
    images: torch.Tensor,
    steps: int | Sequence[int] | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    bf16: bool = False,
    keys: Sequence[int | str] | None = None,
    int8: bool = False,
) -> tuple[torch.Tensor, float]:
    """Encode + decode images (N, 3, R, R) in [-1, 1] in batches of `batch_size`.

    Each image's decode noise has its own generator, seeded from `seed` and its key in `keys` (see
    `image_generators`; `msdd reconstruct` passes the files' own names, so adding, removing or
    reordering other inputs, or another batch size, leaves an image's noise unchanged, and its pixels up to
    the float rounding the module docstring describes). Without
    `keys`, the image's index is its key, seeded as `msdd eval` seeds the same image of the same list.
    Returns (reconstructions quantised to 8 bits (N, 3, R, R), decode seconds per image)."""
    if keys is None:
        keys = range(len(images))
    keys = list(keys)
    if len(keys) != len(images):
        raise ValueError(f"keys: got {len(keys)} for {len(images)} images; give one key per image, or None (the "
                         "images' indices)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs, decode_s = [], 0.0
    for i in range(0, len(images), batch_size):
        z = tok.encode(images[i : i + batch_size], bf16=bf16, int8=int8)
        generators = image_generators(seed, keys[i : i + batch_size])
        synchronize(tok.device)
        t0 = time.perf_counter()
        x = tok.decode(z, steps=steps, guidance=guidance, generator=generators, bf16=bf16, int8=int8)
        synchronize(tok.device)  # a GPU decode returns before its last kernels finish
        decode_s += time.perf_counter() - t0
        outs.append(quantize(x.cpu()))
    return torch.cat(outs), decode_s / max(1, len(images))


def _file_key(name: str) -> str:
    """The output file a name is written to, as a case-insensitive file system sees it."""
    return name.replace("/", "__").casefold()


def unique_names(names: Sequence[str], sources: Sequence[str | Path]) -> list[str]:
    """`names` made unique as output files (`/` -> `__`, any letter case), the same for the same inputs.

    A name several sources share becomes, for each of them, the name with the source's extension
    (`good.png`, `good.jpg`) or, if that still collides, the path relative to their common folder
    (`A/x.png`, `B/x.png`); a name left shared (the same file given twice) gets `-2`, `-3`... in input order."""
    out = list(names)
    groups = defaultdict(list)
    for i, name in enumerate(names):
        groups[_file_key(name)].append(i)
    for idx in (g for g in groups.values() if len(g) > 1):
        with_ext = [names[i] + Path(sources[i]).suffix for i in idx]
        if len({_file_key(n) for n in with_ext}) < len(idx):
            paths = [Path(sources[i]).resolve() for i in idx]
            common = Path(os.path.commonpath(paths))
            if common not in paths:  # not all the same file
                with_ext = [q.relative_to(common).as_posix() for q in paths]
        for i, name in zip(idx, with_ext):
            out[i] = name
    seen = set()
    for i, name in enumerate(out):
        unique, k = name, 1
        while _file_key(unique) in seen:
            k += 1
            unique = f"{name}-{k}"
        seen.add(_file_key(unique))
        out[i] = unique
    return out
