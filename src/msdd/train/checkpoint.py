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
newest checkpoint is reported and the previous one is used. Only the newest `keep` checkpoints are
kept, plus the best one (lowest recorded loss), which is never deleted.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from msdd.hub import _fsync_dir, atomic_save_safetensors, atomic_write_bytes, atomic_write_text, file_sha256

CKPT_SUBDIR = "checkpoints"
MANIFEST = "manifest.json"


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
    """Write checkpoint `step` atomically; keep the newest `keep` and the one with the lowest `loss`."""
    final = _step_dir(Path(run_dir), step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in weights.items():
        atomic_save_safetensors(tensors, tmp / f"{name}.safetensors")
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(tmp / "state.pt", buf.getvalue())
    atomic_write_text(tmp / "config.json", config_json)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
    atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "loss": loss, "files": manifest}, indent=1))
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    best = best_checkpoint(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".step_*.tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def checkpoint_loss(path: Path) -> float | None:
    """The mean training loss recorded in a checkpoint's manifest (None if absent or unreadable)."""
    try:
        loss = json.loads((path / MANIFEST).read_text()).get("loss")
    except (OSError, ValueError):
        return None
    return None if loss is None else float(loss)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest recorded loss, or None when none has one."""
    scored = [(loss, p) for p in list_checkpoints(run_dir) if (loss := checkpoint_loss(p)) is not None]
    return min(scored)[1] if scored else None


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    mpath = path / MANIFEST
    if not mpath.exists():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, info in files.items():
        f = path / name
        if not f.exists():
            return f"missing {name}"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if file_sha256(f) != info["sha256"]:
            return f"{name} content does not match its sha256 (corrupt)"
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, str]:
    """(weights by name, state, config json) of one checkpoint folder. The state file is unpickled with
    weights_only=True: anything but tensors and plain containers is refused, never executed."""
    weights = {p.name[: -len(".safetensors")]: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path / 'state.pt'}: it holds objects other than tensors and plain "
                         f"containers, which could run code when unpickled (not written by msdd?)\n{e}") from None
    return weights, state, (path / "config.json").read_text()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are reported with a warning and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to the previous one", stacklevel=2)
    return None
