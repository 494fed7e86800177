"""Arguments and checks that several `msdd` commands share."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "tiny-64") -> None:
    from msdd.config import preset_names

    p.add_argument("--preset", default=default_preset,
                   help=f"preset name ({', '.join(preset_names())}) or a YAML file (default: {default_preset})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set decoder.depth=4 --set train.lr=1e-4 (repeatable)")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=str, default=None,
                   help="Euler steps per stage: one int for all stages or a comma list, e.g. 30,30,30,30 "
                        "(default: the model's own schedule)")
    p.add_argument("--cfg", dest="guidance", metavar="CFG", type=float, default=None,
                   help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoding noise (default 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for encode/decode")
    p.add_argument("--batch-size", type=int, default=32)


def steps_arg(text: str | None):
    """`--steps` text -> steps per stage (None: the model's)."""
    from msdd.families import parse_steps

    return parse_steps(text)  # a ValueError naming --steps: `main` prints it and exits with 2


def folder_arg(path: str | Path, flag: str) -> Path:
    """A folder argument (--out, --run-dir) checked before any work: a file in its place (or in place of one
    of its parent folders) is an error naming the option, not an OSError traceback after loading a model."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "" if q == p else f" ({q} is a file)"
                raise ValueError(f"{flag} {path} is an existing file, not a folder{what}; pass a folder "
                                 "(it is created if missing)")
            break
    return p


def device_arg(text: str) -> str:
    """`--device`: a device torch knows and this machine has (checked before any work)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise argparse.ArgumentTypeError(f"{text}: no {device.type} device is visible on this machine "
                                         f"(torch.{device.type} is not available); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
