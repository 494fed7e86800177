"""Training checkpoints: complete or absent, never half-written, never unpickled.

    <run>/checkpoints/step_00000500/
        model.safetensors  ema.safetensors  ...   weights (safetensors)
        state.pt                                  optimiser / scheduler / step / RNG / data position
                                                  (tensors and plain containers: loads with weights_only=True)
        config.json                               the run's full config
        manifest.json                             size and sha256 of every file above, and the
                                                  mean training loss since the previous checkpoint;
                                                  written last

A checkpoint is assembled in a hidden temporary folder and renamed into place, so a crash leaves
either the previous checkpoints or the new complete one. On load, the manifest is checked; a damaged
newest checkpoint is reported and the previous one is used. When checkpoints exist but none is intact,
loading stops with `CheckpointError` instead of starting over: a restart from step 0 would rotate the
damaged ones away and overwrite the run's finished model. Only the newest `keep` intact checkpoints are
kept, and the one just written; damaged ones are deleted at the next save (with a warning), so they never
take the place of a good one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from msdd.hub import file_sha256
from msdd.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text, fsync_dir

CKPT_SUBDIR = "checkpoints"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A run directory that cannot be resumed from or written to. A ValueError, so `msdd train` reports it
    as an error (exit code 2) rather than a traceback."""


def check_writable(run_dir: str | Path) -> None:
    """Create `run_dir` and write, fsync and delete a probe file in it (and in its checkpoints folder, if
    there is one): an unwritable run directory then stops a run before its work, not at its first checkpoint."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / CKPT_SUBDIR):
        if folder != run_dir and not folder.is_dir():
            continue
        probe = folder / f".msdd-write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"msdd")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            with contextlib.suppress(OSError):  # a probe written but not synced (disk full)
                probe.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write to the run directory {run_dir} ({folder}: {e.strerror or e}); its "
                                  f"checkpoints, logs and model would be lost. Fix its permissions or free space, or "
                                  f"choose another --run-dir") from None


def _step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_SUBDIR / f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict,
    config_json: str,
    keep: int = 3,
    loss: float | None = None,
) -> Path:
    """Write checkpoint `step` atomically (its manifest records `loss`) and keep the newest `keep` intact ones."""
    final = _step_dir(Path(run_dir), step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    for stale in final.parent.glob(".step_*.tmp-*"):  # left by a process killed while saving: first, for the space
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, tensors in weights.items():
            atomic_save_safetensors(tensors, tmp / f"{name}.safetensors")
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / "state.pt", buf.getvalue())
        atomic_write_text(tmp / "config.json", config_json)
        manifest = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "loss": loss, "files": manifest}, indent=1))
    except OSError as e:  # a full disk, a folder made read-only: the checkpoints written before stay as they are
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the checkpoint of step {step} in {final.parent} ({e}); free space or "
                              f"fix the folder, then run the same command again: it continues from the newest "
                              f"intact checkpoint") from None
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    # Rotation counts only intact checkpoints (a size check: hashing every kept one at each save would cost
    # seconds), so damaged ones never take the place of a good one; the one just written always stays.
    ckpts = list_checkpoints(run_dir)
    problems = {p: None if p == final else verify_checkpoint(p, hashes=False) for p in ckpts}
    intact = [p for p in ckpts if problems[p] is None]
    for old in ckpts:
        if old not in intact[-keep:] and old != final:
            if problems[old]:
                warnings.warn(f"deleting damaged checkpoint {old} ({problems[old]})", stacklevel=2)
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path, hashes: bool = True) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not. hashes=False checks only
    that every file is there with its recorded size (catches incomplete and truncated files, fast)."""
    mpath = path / MANIFEST
    if not mpath.exists():
        return "no manifest (incomplete write)"
    try:
        files = _manifest_files(path)
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, info in files.items():
        f = path / name
        if not f.exists():
            return f"missing {name}"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if hashes and file_sha256(f) != info["sha256"]:
            return f"{name} content does not match its sha256 (corrupt)"
    return None


def _manifest_files(path: Path) -> dict[str, dict]:
    """The files a checkpoint's manifest lists, {name: {"size", "sha256"}}; a ValueError if it is not a manifest
    msdd writes (every checkpoint has its state, its config and at least one weights file)."""
    files = json.loads((path / MANIFEST).read_text())
    files = files.get("files") if isinstance(files, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys()
                                              for v in files.values()):
        raise ValueError("no {name: {size, sha256}} table of files")
    if not {"state.pt", "config.json"} <= files.keys() or not any(n.endswith(".safetensors") for n in files):
        raise ValueError(f"it lists {sorted(files)}, not the state, config and weights of a checkpoint")
    return files


class _Weights(dict):
    """A checkpoint's weights by name: a name it lacks is a checkpoint of another kind of run (a stage-1 run's in a
    distillation's run directory, or the reverse), an error that says so rather than a KeyError."""

    def __init__(self, path: Path, weights: dict):
        super().__init__(weights)
        self.path = path

    def __missing__(self, name: str):
        raise ValueError(f"cannot resume {self.path}: it holds no {name!r} weights (it holds {sorted(self)}), so it is "
                         "a checkpoint of another kind of run; choose a new --run-dir")


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, str]:
    """(weights by name, state, config json) of one checkpoint folder. The state file is unpickled with
    weights_only=True: anything but tensors and plain containers is refused, never executed."""
    names = [n for n in _manifest_files(path) if n.endswith(".safetensors")]  # not other files put there
    weights = _Weights(path, {n[: -len(".safetensors")]: load_file(str(path / n)) for n in names})
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path / 'state.pt'}: it holds objects other than tensors and plain "
                         f"containers, which could run code when unpickled (not written by msdd?)\n{e}") from None
    return weights, state, (path / "config.json").read_text()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint, None if there are none; damaged newer ones are reported with a warning
    and skipped. If there are checkpoints but every one is damaged, CheckpointError lists them: starting
    over silently would train from step 0 and, at its first save, rotate the damaged ones away."""
    damaged = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            for old, why in damaged:
                warnings.warn(f"checkpoint {old} is damaged ({why}); falling back to the previous one", stacklevel=2)
            return path
        damaged.append((path, problem))
    if damaged:
        root = Path(run_dir) / CKPT_SUBDIR
        raise CheckpointError(
            f"every checkpoint in {root} is damaged, so this run cannot continue:\n  "
            + "\n  ".join(f"{p.name}: {why}" for p, why in reversed(damaged))
            + f"\nnot starting over from step 0: that would rotate them away and overwrite {Path(run_dir) / 'model'}. "
              f"To continue, restore an intact checkpoint there; to start afresh, move or delete {root} (or use a "
              f"new --run-dir)")
    return None
