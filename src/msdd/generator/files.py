"""A trained generator on disk, and the image files of `msdd generate`.

A generator directory holds `config.json` (format "msdd-generator": the `generator` section, the latent
shape it was trained on, the tokenizer it learnt from and its class names) and `model.safetensors`,
written atomically like a tokenizer's (`msdd.hub`, `msdd.io`); no pickle anywhere.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
from PIL import Image

from msdd.config.dicts import from_dict, to_dict
from msdd.data.images import to_uint8
from msdd.eval.grid import grid_image
from msdd.generator.config import GeneratorConfig
from msdd.generator.model import LatentDiT
from msdd.hub import CONFIG_NAME, WEIGHTS_NAME, check_weights, read_weights
from msdd.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text

FORMAT = "msdd-generator"
FORMAT_VERSION = 1
_HINT = "pass the <run>/model folder that `msdd gen-train` writes"


def save_generator(model: LatentDiT, directory: str | Path, **metadata) -> Path:
    """Write `model` (weights and config, plus `metadata`) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), directory / WEIGHTS_NAME)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "generator": to_dict(model.config),
            "latent_shape": list(model.latent_shape), **metadata}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return directory


def read_generator_metadata(directory: Path) -> dict:
    """The checked `config.json` of a generator directory; anything else is an error naming the file."""
    path = directory / CONFIG_NAME
    if not directory.is_dir() or not path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"--generator {directory}: not a generator directory (expected {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} inside); {_HINT}")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_HINT}") from None
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind != FORMAT:
        also = "; it is a tokenizer: pass it as --tokenizer" if kind == "msdd-tokenizer" else ""
        raise ValueError(f"--generator {directory}: {path} is not a generator's config (format {kind!r}){also}; "
                         f"{_HINT}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not one this msdd reads (1 to {FORMAT_VERSION}); "
                         "upgrade msdd to load it")
    if not isinstance(meta.get("generator"), dict):  # read by `load_generator`: a KeyError or TypeError otherwise
        raise ValueError(f"{path} has no \"generator\" section (the network's settings) or it is not an object; "
                         f"{_HINT}")
    shape = meta.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) in (2, 3)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise ValueError(f"{path}: latent_shape must be [tokens, channels] or [channels, height, width] (ints >= 1), "
                         f"got {shape!r}; {_HINT}")
    return meta


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[LatentDiT, dict]:
    """The generator saved at `path` (on `device`, in eval mode) and its metadata."""
    directory = Path(path).expanduser()
    meta = read_generator_metadata(directory)
    model = LatentDiT(from_dict(GeneratorConfig, meta["generator"], "generator"), meta["latent_shape"])
    state = read_weights(directory / WEIGHTS_NAME)
    check_weights(directory, model.state_dict(), state)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_grid(images: torch.Tensor) -> Image.Image:
    """Images (n, 3, R, R) in [-1, 1] read row by row on a near-square grid (ceil(sqrt n) columns; white
    fills the last row)."""
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = torch.cat([images.float().cpu(), torch.ones(rows * cols - n, *images.shape[1:])])  # (rows*cols, 3, R, R)
    return grid_image([padded[j::cols] for j in range(cols)])  # column j holds images j, j + cols, ...


def write_samples(images: torch.Tensor, out_dir: str | Path) -> Path:
    """`out_dir`/images/00000.png ... (one per image) and `out_dir`/grid.png, each written atomically.
    Returns the grid's path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        pixels = to_uint8(x.cpu()).permute(1, 2, 0).numpy()  # (R, R, 3)
        atomic_write_bytes(out / "images" / f"{i:05d}.png", png_bytes(Image.fromarray(pixels)))
    atomic_write_bytes(out / "grid.png", png_bytes(sample_grid(images)))
    return out / "grid.png"
