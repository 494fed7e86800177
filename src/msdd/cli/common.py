"""Arguments and checks that several `msdd` commands share."""

from __future__ import annotations

import argparse
import contextlib
import json
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
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the decoding noise (default 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for encode/decode")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")


def steps_arg(text: str | None):
    """`--steps` text -> steps per stage (None: the model's)."""
    from msdd.families import parse_steps

    return parse_steps(text)  # a ValueError naming --steps: `main` prints it and exits with 2


@contextlib.contextmanager
def removed_if_left_empty(folder: str | Path):
    """A run directory this command creates is removed again when the command fails before writing anything
    into it (a bad data source found after the directory was made): no empty folder is left behind, nor the parent
    folders it created (`--run-dir runs/a/b` with no `runs`)."""
    folder = Path(folder).absolute()
    created = [folder, *folder.parents]
    created = created[:next(i for i, p in enumerate(created) if p.exists())]  # the folders that do not exist yet
    try:
        yield
    except BaseException:
        for path in created:  # the deepest first; an emptied parent goes next
            try:
                path.rmdir()
            except FileNotFoundError:
                continue  # never made (the command failed before making it)
            except OSError:
                break  # not empty (logs, checkpoints: kept)
        raise


def folder_arg(path: str | Path, flag: str) -> Path:
    """A folder argument (--out, --run-dir) checked before any work: a file in its place (or in place of one
    of its parent folders), an empty path or a place this process cannot write is an error naming the option,
    not an OSError traceback after loading a model or training. Nothing is created here."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; pass a folder (it is created if missing)")
    p = Path(path).expanduser()
    _check_folder(p, f"{flag} {path}")
    return p


def new_folder_arg(path: str | Path, flag: str) -> Path:
    """An output folder that an export writes whole (`msdd.io.atomic_folder`): `folder_arg`, and missing or empty, so
    that an export never writes over a model or mixes its files with another's."""
    p = folder_arg(path, flag)
    held = sorted(f.name for f in p.iterdir()) if p.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ValueError(f"{flag} {path} already holds files ({shown}); pass a new or empty folder (an export does "
                         "not write over an existing one)")
    return p


def file_arg(path: str | Path, flag: str) -> Path:
    """An output file argument (--json, --out FILE) checked before any work as `folder_arg` checks a folder: not an
    existing folder, its folder creatable and writable."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; pass a file path")
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {path} is an existing folder; pass a file path, e.g. {Path(path) / 'out.json'}")
    _check_folder(p.parent, f"{flag} {path}", of_file=True)
    return p


def _check_folder(p: Path, what: str, of_file: bool = False) -> None:
    """The nearest existing one of p and its parents is a folder this process can write in (p: the folder of the
    argument's file where `of_file`)."""
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                if of_file:
                    raise ValueError(f"{what}: {q} is a file, so it cannot hold the output; choose another path")
                where = "" if q == p else f" ({q} is a file)"
                raise ValueError(f"{what} is an existing file, not a folder{where}; pass a folder (it is created "
                                 "if missing)")
            _writable(q, what)
            return


def _writable(folder: Path, what: str) -> None:
    """Create and remove a temporary folder in `folder`: the one test of writing there that also holds where
    permissions do not tell (root on a read-only or virtual file system)."""
    import tempfile

    try:
        Path(tempfile.mkdtemp(prefix=".msdd-check-", dir=folder)).rmdir()
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {folder} ({e.strerror or e}); choose a place you can "
                         "write to") from None


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a budget in minutes); argparse names the option in its error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number; give one above 0, e.g. 10")
    return value


def seed_arg(text: str) -> int:
    """An argparse type: a seed, a whole number in [0, 2**63) (as the configs' train.seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is out of range; give a whole number in [0, 2**63), e.g. 0")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (steps, seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is below 1; give a whole number of at least 1")
    return value


def device_arg(text: str) -> str:
    """`--device`: a device torch knows and this machine has (checked before any work)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available.get(device.type, False):  # xpu, meta, ...: not a device msdd runs on
        raise argparse.ArgumentTypeError(f"{text}: no {device.type} device is visible on this machine "
                                         f"(torch.{device.type} is not available); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def finish_training(trainer, summary: dict, what: str) -> int:
    """Print the summary (rank 0), end the process group; exit code 128 + signal when interrupted."""
    import signal

    from msdd.dist import cleanup

    if trainer.dist.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"last": summary["last"]}, indent=2))
        if not summary["interrupted"]:
            print(f"{what} written to {trainer.run_dir / 'model'}")
    cleanup()
    stop = summary["interrupted"]
    if not stop:
        return 0
    return 128 + signal.Signals[stop] if stop in signal.Signals.__members__ else 1
