"""Saving and loading models: a directory with `config.json` + `model.safetensors` (the Hugging Face
layout, so `huggingface_hub` can upload/download it unchanged). Files are written atomically
(temporary name, fsync, rename) so an interrupted save never leaves a half-written model behind.
No pickle anywhere: tensors go through safetensors, metadata through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from msdd.config import model_config_from_dict, to_dict

FORMAT = "msdd-tokenizer"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Shipped pretrained tiny-64 models (see pretrained/README.md); the student is used when no model is given.
BUNDLED_DIR = Path(__file__).parent / "pretrained"
BUNDLED = {"tiny-64": BUNDLED_DIR / "tiny-64-student", "tiny-64-student": BUNDLED_DIR / "tiny-64-student",
           "tiny-64-teacher": BUNDLED_DIR / "tiny-64-teacher"}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tokenizer(tokenizer, directory: str | Path, dtype: torch.dtype | None = None, **extra_metadata) -> Path:
    """Write `tokenizer` (weights, buffers and config) to `directory`; `dtype` (e.g. torch.float16) stores the
    floating-point tensors in that type (they are loaded back into the model's fp32 parameters)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = tokenizer.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save_safetensors(state, directory / WEIGHTS_NAME)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(tokenizer.config), **extra_metadata}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return directory


def export_tokenizer(source: str | Path, destination: str | Path, dtype: str = "fp16") -> Path:
    """Copy the model at `source` to `destination` with its weights stored as `dtype` (fp16 halves the file;
    the metadata keeps the source's training record and names the source file's sha256)."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype!r}: expected one of {list(dtypes)}")
    tok = load_tokenizer(source)
    extra = {k: v for k, v in tok.metadata.items() if k not in ("format", "format_version", "model")}
    extra.update(weights_dtype=dtype, exported_from_sha256=file_sha256(resolve_model_dir(source) / WEIGHTS_NAME))
    return save_tokenizer(tok, destination, dtype=dtypes[dtype], **extra)


def looks_like_path(text: str) -> bool:
    """True for a model name that can only mean a local path, never a Hugging Face repo id ("owner/name"):
    it starts with `.`, `/` or `~`, has more than one `/`, ends with a file extension, or its parent
    directory exists here (`runs/model` when `runs/` exists)."""
    p = Path(text).expanduser()
    extension = re.search(r"\.[A-Za-z][A-Za-z0-9]*$", p.name)  # .safetensors, .pt, .h5; not "-v1.5" of a repo name
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or extension is not None
            or (str(p.parent) != "." and p.parent.is_dir()))


def resolve_model_dir(path: str | Path | None) -> Path:
    """A local model directory for `path`: a folder, a Hugging Face repo id (downloaded only when no local
    path of that name exists and it cannot be a path, see `looks_like_path`), or the bundled one."""
    if path is None or str(path) in BUNDLED:
        bundled = BUNDLED["tiny-64" if path is None else str(path)]
        if (bundled / CONFIG_NAME).exists():
            return bundled
        raise FileNotFoundError(f"the bundled model {bundled.name} is not installed; pass a model directory "
                                "(e.g. runs/a/model) written by `msdd train` or `Tokenizer.save_pretrained`")
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / CONFIG_NAME).exists() or not (p / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{p} is not an msdd model directory: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                                    f"inside (a training run keeps its model in <run>/model)")
        return p
    if p.exists():
        raise ValueError(f"{p} is a file; pass the model directory that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    # a path typo (`runs/modle`) must be reported as one, not sent to the network as a repo id
    local = (f"a model directory (e.g. runs/a/model, written by `msdd train` or `Tokenizer.save_pretrained`) "
             f"or a bundled model name ({', '.join(BUNDLED)})")
    if isinstance(path, Path) or str(path).count("/") != 1 or looks_like_path(str(path)):
        raise FileNotFoundError(f"model directory {p} does not exist; pass {local}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as e:  # offline, unknown repo, ...
        raise FileNotFoundError(f"model {path!r} is not a local directory ({p} does not exist) and could not be "
                                f"downloaded as a Hugging Face Hub repo id ({type(e).__name__}: {e}); pass {local}, "
                                "or a Hub repo id while online") from None


def read_model_metadata(directory: Path) -> dict:
    meta = json.loads((directory / CONFIG_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME} is not an msdd model config (format {meta.get('format')!r})")
    return meta


def load_tokenizer(path: str | Path | None = None, device: str | torch.device = "cpu"):
    from msdd.tokenizer import Tokenizer

    directory = resolve_model_dir(path)
    meta = read_model_metadata(directory)
    tok = Tokenizer(model_config_from_dict(meta["model"]))
    state = load_file(str(directory / WEIGHTS_NAME))
    missing, unexpected = set(tok.state_dict()) - set(state), set(state) - set(tok.state_dict())
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    tok.load_state_dict(state)
    tok.metadata = meta
    return tok.to(device).eval()
