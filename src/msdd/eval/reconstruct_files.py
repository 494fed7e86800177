"""`msdd reconstruct` on files and folders of any size and number: a DataLoader streams the files, every
reconstruction is written (atomically) and scored as soon as it is decoded, and a rerun with
`skip_existing` scores the PNGs already written instead of decoding them again, after checking in
reconstruct.json that they were decoded by the same weights with the same settings.

Sizes (`size`): "crop" centre-crops every file to the model's resolution R (shorter side resized to R);
"keep" reconstructs every file at its own size from overlapping tiles (`msdd.tiles`, sides shorter than
R padded by reflection); "auto" (the default) keeps the size of files larger than R and decodes R x R
files as they are. Outputs: reconstructions/NAME.png, metrics.csv (a row per image, written as it goes)
and grid.png (real | reconstruction | |error| x 4 for the first 16 images, centre-cropped to R).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from msdd.data import BadImageError, center_crop_arr, list_images, load_image, to_tensor, to_uint8
from msdd.eval.grid import save_grid
from msdd.eval.metrics import psnr_per_image, quantize, ssim_per_image
from msdd.eval.reconstruct import reconstruct_images, unique_names
from msdd.hub import tensors_sha256
from msdd.io import atomic_write_text
from msdd.models import cpu_kernels
from msdd.tiles import reconstruct_tiled

SIZES = ("auto", "keep", "crop")


def list_inputs(inputs: Sequence[str | Path],
                exclude: Sequence[str | Path] = ()) -> tuple[list[Path], list[str], list[bool], list[str]]:
    """Files and folders (searched recursively) -> (files, unique output names, given explicitly, noise keys).

    A file's noise key is its own name (a file's stem, or its path in the folder given, without the extension):
    unlike its output name, it does not change when another input's name collides with it.

    Output folders in `exclude` are not read when they lie inside an input folder (when one is the input
    folder itself, its `reconstructions/` and `grid.png` are not), so a rerun does not take its own
    reconstructions as inputs."""
    excluded = [Path(e).expanduser().resolve() for e in exclude]
    found: list[tuple[Path, str, bool]] = []  # (file, name, given explicitly)
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        if p.is_file():
            found.append((p, p.stem, True))
            continue
        skip = _outputs_inside(p, excluded)
        for f in list_images(p):
            resolved = f.resolve()
            if not any(q == resolved or q in resolved.parents for q in skip):
                found.append((f, f.relative_to(p).with_suffix("").as_posix(), False))
    if not found:  # every image found lies in an output folder (an earlier run's reconstructions, its grid)
        raise ValueError(f"no image to reconstruct in {list(map(str, inputs))}: the images there are this command's "
                         "own outputs (reconstructions/, grid.png), which are not read as inputs; pass the original "
                         "images, or another --out")
    files, names, explicit = (list(column) for column in zip(*found))
    return files, unique_names(names, files), explicit, names


def _outputs_inside(folder: Path, out_dirs: Sequence[Path]) -> list[Path]:
    """The paths `reconstruct_files` writes into `out_dirs` that lie inside the input `folder`."""
    folder = folder.resolve()
    inside = []
    for out in out_dirs:
        if folder in out.parents:
            inside.append(out)
        elif out == folder:
            inside += [out / "reconstructions", out / "grid.png"]
    return inside


class InputFiles(torch.utils.data.Dataset):
    """File i -> (i, image (3, H, W) in [-1, 1] or None, None or why it is unusable and the fix) (two
    strings, not the BadImageError: they cross from DataLoader workers)."""

    def __init__(self, files: Sequence[Path], resolution: int, size: str):
        self.files, self.r, self.size = list(files), resolution, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            arr = load_image(self.files[i])
            if min(arr.shape[:2]) < self.r and self.size != "keep":
                raise BadImageError(self.files[i], f"{arr.shape[1]}x{arr.shape[0]} px is smaller than the model "
                                                   f"resolution {self.r}",
                                    fix=f"Upscale it to at least {self.r} px on the shorter side, or pass "
                                        f"--keep-size to pad it.")
        except BadImageError as e:
            return i, None, (e.reason, e.fix)
        return i, to_tensor(center_crop_arr(arr, self.r) if self.size == "crop" else arr), None


def _write_png(path: Path, x: torch.Tensor) -> None:
    """A uint8 PNG of x (3, H, W) in [-1, 1], written under a temporary name and renamed: a killed run
    never leaves a truncated file that a rerun with skip_existing would take as done."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def _read_png(path: Path, shape: torch.Size) -> torch.Tensor | None:
    """A reconstruction written before, as (3, H, W) in [-1, 1], or None if unreadable or of another size."""
    try:
        x = to_tensor(np.asarray(Image.open(path).convert("RGB")))
    except (OSError, ValueError):
        return None
    return x if x.shape == shape else None


def _check_earlier_run(out: Path, settings: dict) -> None:
    """`skip_existing`: the PNGs in `out` may be kept only if reconstruct.json says the same weights and settings
    made them (a rerun with another --model or --seed would otherwise score the old model's images as its own)."""
    if not (out / "reconstructions").is_dir():
        return
    try:
        earlier = json.loads((out / "reconstruct.json").read_text())
    except (OSError, ValueError):
        raise ValueError(f"--skip-existing: {out} holds reconstructions without a readable reconstruct.json, so "
                         "nothing says which model and settings made them; choose a new --out, or drop "
                         "--skip-existing to decode every image again") from None
    differ = [f"{k}: {earlier.get(k)!r} -> {v!r}" for k, v in settings.items() if earlier.get(k) != v]
    if differ:
        raise ValueError(f"--skip-existing: the reconstructions in {out} were made with other settings, so they "
                         f"cannot be kept as this run's:\n  " + "\n  ".join(differ)
                         + "\nchoose a new --out, or drop --skip-existing to decode every image again")


def reconstruct_files(tok, files: Sequence[Path], names: Sequence[str], explicit: Sequence[bool], out_dir: str | Path,
                      size: str = "auto", tile_overlap: int | None = None, steps=None, guidance: float | None = None,
                      seed: int = 0, batch_size: int = 32, bf16: bool = False, skip_existing: bool = False,
                      workers: int = 0, grid_rows: int = 16, int8: bool = False,
                      keys: Sequence[str] | None = None) -> dict:
    """Reconstruct `files` into `out_dir` (see the module docstring). A bad file given explicitly raises
    BadImageError; one found in a folder is skipped with a warning and counted. Every image's noise is
    seeded from `seed` and its key (default: its name; `image_generators`; tiles from key and tile index). Returns
    {n, psnr, ssim (means), skipped: [(path, reason)], reused (PNGs kept by skip_existing), decode_s}."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    out, r = Path(out_dir), tok.config.image_size
    keys = list(names if keys is None else keys)
    # resolved (bad options fail before anything is written) and kept in reconstruct.json for --skip-existing
    settings = {"weights_sha256": tensors_sha256(tok.state_dict()), "seed": seed,
                "steps": list(tok.resolve_steps(steps)), "guidance": tok.resolve_guidance(guidance), "bf16": bf16,
                "int8": int8, "size": size, "tile_overlap": tile_overlap}
    if skip_existing:
        _check_earlier_run(out, settings)
    loader = torch.utils.data.DataLoader(InputFiles(files, r, size), batch_size=None, num_workers=workers)
    rows, skipped, grid, reused, decode_s, pending = [], [], [], 0, 0.0, []
    if tok.device.type == "cpu":  # the fused kernels build on a machine's first decode: not decode time
        cpu_kernels.library()
    csv_file, writer = None, None

    def finish(i: int, x: torch.Tensor, y: torch.Tensor, write: bool) -> None:
        nonlocal csv_file, writer
        if csv_file is None:  # the outputs appear with the first image
            (out / "reconstructions").mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "reconstruct.json", json.dumps(settings, indent=1) + "\n")
            # surrogateescape: a name that is not UTF-8 is written as its own bytes
            csv_file = open(out / "metrics.csv", "w", newline="", encoding="utf-8", errors="surrogateescape")
            writer = csv.writer(csv_file)
            writer.writerow(["name", "psnr_db", "ssim"])
        if write:
            _write_png(out / "reconstructions" / f"{_file_key_name(names[i])}.png", y)
        p, s = psnr_per_image(y[None], x[None]).item(), ssim_per_image(y[None], x[None]).item()
        rows.append((p, s))
        writer.writerow([names[i], f"{p:.3f}", "" if math.isnan(s) else f"{s:.4f}"])  # "": a side under 6 px
        csv_file.flush()
        if len(grid) < grid_rows:
            grid.append((_grid_crop(x, r), _grid_crop(y, r)))

    def flush() -> None:
        nonlocal decode_s
        if pending:
            idx = [i for i, _ in pending]
            images = torch.stack([x for _, x in pending])
            t0 = time.perf_counter()
            recon, _ = reconstruct_images(tok, images, steps, guidance, seed, len(idx), bf16,
                                          keys=[keys[i] for i in idx], int8=int8)
            decode_s += time.perf_counter() - t0
            for i, x, y in zip(idx, images, recon):
                finish(i, x, y, True)
            pending.clear()

    try:
        for i, x, err in tqdm(loader, total=len(files), desc="reconstruct", unit="img", disable=None):
            if err is not None:
                if explicit[i]:
                    raise BadImageError(files[i], *err)
                warnings.warn(f"skipping {files[i]}: {err[0]}. {err[1]}")
                skipped.append((str(files[i]), err[0]))
                continue
            done = out / "reconstructions" / f"{_file_key_name(names[i])}.png"
            y = _read_png(done, x.shape) if skip_existing and done.is_file() else None
            if y is not None:
                reused += 1
                finish(i, x, y, False)
            elif x.shape[1:] == (r, r) and size != "keep":
                pending.append((i, x))
                if len(pending) == batch_size:
                    flush()
            else:
                t0 = time.perf_counter()
                y = quantize(reconstruct_tiled(tok, x, tile_overlap, key=keys[i], seed=seed, batch_size=batch_size,
                                               steps=steps, guidance=guidance, bf16=bf16, int8=int8))
                decode_s += time.perf_counter() - t0
                finish(i, x, y, True)
        flush()
    finally:
        if csv_file is not None:
            csv_file.close()
    if not rows:
        raise ValueError(f"no usable image among {len(files)} files ({len(skipped)} skipped); the warnings above say "
                         "why each was skipped and how to make it usable")
    real, recon = torch.stack([g[0] for g in grid]), torch.stack([g[1] for g in grid])
    save_grid([real, recon, ((recon - real).abs() * 4 - 1).clamp(-1, 1)], out / "grid.png",
              labels=["input", "output", "error x4"])
    done_n = len(rows) - reused
    ssims = [s for _, s in rows if not math.isnan(s)]  # SSIM has no value for images with a side under 6 px
    return {"n": len(rows), "psnr": float(np.mean([p for p, _ in rows])),
            "ssim": float(np.mean(ssims)) if ssims else float("nan"),
            "skipped": skipped, "reused": reused, "decode_s": decode_s / max(1, done_n)}


def _file_key_name(name: str) -> str:
    return name.replace("/", "__")


def _grid_crop(x: torch.Tensor, r: int) -> torch.Tensor:
    """(3, H, W) -> its centre R x R view for the grid (shorter side resized to R, as `--size crop`)."""
    return x if x.shape[1:] == (r, r) else to_tensor(center_crop_arr(to_uint8(x).permute(1, 2, 0).numpy(), r))
