"""Reconstruct images with a tokenizer: batched encode + decode, files in, PNGs / grid / CSV out.

Every input gets its own name (CSV row and PNG): its path relative to the folder it was found in (the file
name for a file given directly), without the extension; names that several inputs share (`A/x.png B/x.png`,
`good.png good.jpg`) are made unique from the part of the paths that tells them apart (`unique_names`).

Every image's decode noise comes from its own generator (`image_generators`), seeded from the seed and a
key of that image alone: `msdd reconstruct` uses the image's output name, so an image's noise does not
depend on `--batch-size`, on the order of the inputs or on the other files in the folder (except where
another input shares its name and `unique_names` renames both). What remains is float rounding: a batch of
several images goes through the network's matrix products in another order than a batch of one, which
moves a rare pixel by one level of 255 (about 1 value in 12,288 at 64 px); with `--batch-size 1` the
results are bit-identical whatever the other inputs.
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from msdd.data import BadImageError, center_crop_arr, list_images, load_image, to_tensor, to_uint8
from msdd.eval.grid import save_grid
from msdd.eval.metrics import psnr_per_image, quantize, ssim_per_image
from msdd.tokenizer import Tokenizer


def image_generators(seed: int, keys: Sequence[int | str]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from `seed` and the image's own key (the decode noise of one
    image then never depends on its batch or its neighbours; `Tokenizer.decode` takes the list).

    An int key (an index) is seeded as `msdd eval` seeds image i: `seed * 1_000_003 + i`. A str key (the
    output name `msdd reconstruct` gives the image) is seeded with the first 63 bits of
    sha256(f"{seed}:{key}"): stable across runs, processes and machines (unlike Python's `hash`)."""
    out = []
    for key in keys:
        if isinstance(key, str):
            value = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1
        else:
            value = seed * 1_000_003 + int(key)
        out.append(torch.Generator().manual_seed(value))
    return out


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
) -> tuple[torch.Tensor, float]:
    """Encode + decode images (N, 3, R, R) in [-1, 1] in batches of `batch_size`.

    Each image's decode noise has its own generator, seeded from `seed` and its key in `keys` (see
    `image_generators`; `msdd reconstruct` passes the unique output names, so adding, removing or
    reordering other inputs, or another batch size, leaves an image's noise unchanged, and its pixels up to
    the float rounding the module docstring describes). Without
    `keys`, the image's index is its key, seeded as `msdd eval` seeds the same image of the same list.
    Returns (reconstructions quantised to 8 bits (N, 3, R, R), decode seconds per image)."""
    if keys is None:
        keys = range(len(images))
    keys = list(keys)
    if len(keys) != len(images):
        raise ValueError(f"got {len(keys)} keys for {len(images)} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs, decode_s = [], 0.0
    for i in range(0, len(images), batch_size):
        z = tok.encode(images[i : i + batch_size], bf16=bf16)
        generators = image_generators(seed, keys[i : i + batch_size])
        t0 = time.perf_counter()
        x = tok.decode(z, steps=steps, guidance=guidance, generator=generators, bf16=bf16)
        decode_s += time.perf_counter() - t0
        outs.append(quantize(x.cpu()))
    return torch.cat(outs), decode_s / max(1, len(images))


def collect_inputs(
    inputs: Sequence[str | Path], resolution: int, exclude: Sequence[str | Path] = ()
) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    """Load files and folders (recursively), ADM centre crop to `resolution`.

    A bad or too-small file named explicitly is an error; inside a folder it is skipped with a warning.
    Output folders in `exclude` are not read when they lie inside an input folder (when one is the input
    folder itself, its `reconstructions/` and `grid.png` are not), so a rerun does not take its own
    reconstructions as inputs. Returns (images (N, 3, R, R), unique names (see `unique_names`), skipped
    (path, reason))."""
    excluded = [Path(e).expanduser().resolve() for e in exclude]
    tensors, names, sources, skipped = [], [], [], []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        files, explicit = ([p], True) if p.is_file() else (list_images(p), False)
        if not explicit:
            skip = _outputs_inside(p, excluded)
            files = [f for f in files if not any(q == f.resolve() or q in f.resolve().parents for q in skip)]
        for f in files:
            try:
                arr = load_image(f)
                if min(arr.shape[:2]) < resolution:
                    raise BadImageError(f, f"{arr.shape[1]}x{arr.shape[0]} px is smaller than the model resolution "
                                           f"{resolution}; upscale it to at least {resolution} px on the shorter side")
            except BadImageError as e:
                if explicit:
                    raise
                warnings.warn(f"skipping {f}: {e.reason}")
                skipped.append((str(f), e.reason))
                continue
            tensors.append(to_tensor(center_crop_arr(arr, resolution)))
            names.append(f.stem if explicit else f.relative_to(p).with_suffix("").as_posix())
            sources.append(f)
    if not tensors:
        raise ValueError(f"no usable image in {list(map(str, inputs))}")
    return torch.stack(tensors), unique_names(names, sources), skipped


def _outputs_inside(folder: Path, out_dirs: Sequence[Path]) -> list[Path]:
    """The paths `write_reconstructions` writes into `out_dirs` that lie inside the input `folder`."""
    folder = folder.resolve()
    inside = []
    for out in out_dirs:
        if folder in out.parents:
            inside.append(out)
        elif out == folder:
            inside += [out / "reconstructions", out / "grid.png"]
    return inside


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


def write_reconstructions(
    out_dir: str | Path, names: list[str], images: torch.Tensor, recon: torch.Tensor, max_grid_rows: int = 16
) -> dict:
    """PNGs of the reconstructions, a grid real | reconstruction | |error| x 4 and metrics.csv."""
    out = Path(out_dir)
    if len({_file_key(n) for n in names}) < len(names):
        raise ValueError(f"reconstruction names must be unique as file names (`/` -> `__`, any letter case), got "
                         f"{sorted(names)}; make them unique with msdd.eval.reconstruct.unique_names")
    (out / "reconstructions").mkdir(parents=True, exist_ok=True)
    psnr, ssim = psnr_per_image(recon, images), ssim_per_image(recon, images)
    for name, x in zip(names, to_uint8(recon)):
        path = out / "reconstructions" / f"{name.replace('/', '__')}.png"
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)
    err = ((recon - images).abs() * 4 - 1).clamp(-1, 1)  # |error| on the [0, 1] scale, magnified 4x, as an image
    save_grid([images[:max_grid_rows], recon[:max_grid_rows], err[:max_grid_rows]], out / "grid.png")
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "psnr_db", "ssim"])
        for name, p, s in zip(names, psnr.tolist(), ssim.tolist()):
            w.writerow([name, f"{p:.3f}", f"{s:.4f}"])
    return {"psnr": psnr.mean().item(), "ssim": ssim.mean().item(), "n": len(names)}
