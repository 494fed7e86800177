"""Saving and loading models: a directory with `config.json` + `model.safetensors` (the Hugging Face
layout, so `huggingface_hub` can upload/download it unchanged). Files are written atomically
(temporary name, fsync, rename) so an interrupted save never leaves a half-written model behind.
No pickle anywhere: tensors go through safetensors, metadata through JSON. This module reads and writes
the files; `Tokenizer.from_pretrained` (msdd.tokenizer) builds the model from them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from msdd.config import model_config_from_dict, to_dict
from msdd.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text

FORMAT = "msdd-tokenizer"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Shipped pretrained tiny-64 models (see pretrained/README.md); the student is used when no model is given.
BUNDLED_DIR = Path(__file__).parent / "pretrained"
BUNDLED = {"tiny-64": BUNDLED_DIR / "tiny-64-student", "tiny-64-student": BUNDLED_DIR / "tiny-64-student",
           "tiny-64-teacher": BUNDLED_DIR / "tiny-64-teacher"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors in memory, e.g. a module's state_dict: their names, dtypes, element counts and
    values (not their shapes, which a model's config fixes; the formula is kept as it is so that digests stored by
    earlier runs still compare)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latent_space_sha256(tokenizer) -> str:
    """A digest of what defines a tokenizer's latents: its encoder and its latent statistics (a distilled student
    shares its teacher's, so a generator of the teacher's latents is one of the student's too)."""
    state = tokenizer.state_dict()
    return tensors_sha256({k: v for k, v in state.items() if k.startswith("encoder.") or k.startswith("latent_")})


# config.json keys that describe the file rather than the model's record (`Tokenizer.metadata`): a save that writes
# the weights anew drops them (or writes its own)
FILE_METADATA = ("format", "format_version", "model", "weights_dtype", "exported_from_sha256")


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


def looks_like_path(text: str) -> bool:
    """True for a model name that can only mean a local path, never a Hugging Face repo id ("owner/name"):
    it starts with `.`, `/` or `~`, has more than one `/`, ends with the suffix of a weights, config or image file,
    or its parent directory exists here (`runs/model` when `runs/` exists). Other suffixes are a repo name's own
    ("whisper-tiny.en", "-v1.5")."""
    p = Path(text).expanduser()
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or p.suffix.lower() in FILE_SUFFIXES
            or (str(p.parent) != "." and p.parent.is_dir()))


FILE_SUFFIXES = {".safetensors", ".json", ".yaml", ".yml", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".h5", ".pkl",
                 ".npz", ".npy", ".tar", ".gz", ".zip", ".png", ".jpg", ".jpeg"}


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
            hint = "a training run keeps its model in <run>/model"
            if (p / "onnx.json").exists():
                hint = "an ONNX export: run it with msdd.integrations.onnx.OnnxTokenizer"
            elif (p / "diffusion_pytorch_model.safetensors").exists():
                hint = ("a diffusers export: load it with msdd.integrations.diffusers.AutoencoderMSDD.from_pretrained, "
                        "or make it an msdd model with import_diffusers")
            raise FileNotFoundError(f"{p} is not an msdd model directory: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                                    f"inside ({hint})")
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
        reason = " ".join(str(e).split())  # one line: huggingface_hub's messages span several
        raise FileNotFoundError(f"model {path!r} is not a local directory ({p} does not exist) and could not be "
                                f"downloaded as a Hugging Face Hub repo id ({type(e).__name__}: {reason}); "
                                f"pass {local}, "
                                "or a Hub repo id while online") from None


def read_model_metadata(directory: Path) -> dict:
    """The checked `config.json` of a model directory: an msdd config object with a `model` section, of a
    format version this code reads. Anything else is a ValueError naming the file."""
    path = directory / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the original model, or save the model "
                         "again with `Tokenizer.save_pretrained`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = f"format {meta.get('format')!r}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{path} is not an msdd model config ({what}; expected an object with \"format\": "
                         f"\"{FORMAT}\"); pass a directory written by `msdd train` or `Tokenizer.save_pretrained`")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: format_version must be an int >= 1, got {version!r}; restore it from the original "
                         "model, or save the model again with `Tokenizer.save_pretrained`")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}, newer than this msdd reads ({FORMAT_VERSION}); "
                         "upgrade msdd (pip install -U msdd) to load it")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{path} has no \"model\" section (the architecture) or it is not an object; restore "
                         "it from the original model, or save the model again with `Tokenizer.save_pretrained`")
    return meta


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged file (empty, truncated, not safetensors) is a ValueError
    naming it."""
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (header), OSError/RuntimeError (data cut short)
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path} is damaged or not a safetensors file ({size} bytes; {type(e).__name__}: {e}); "
                         "copy or download the model again") from None


def stored_dtype(directory: str | Path) -> torch.dtype | None:
    """The type the floating-point weights of a model directory are stored in (None: no float tensor)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                     "F64": torch.float64}.get(t.get_dtype())
            if dtype is not None:
                return dtype
    return None


def check_weights(directory: Path, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Refuse weights `state` (read from `directory`) that do not fit the model its config builds (`own`)."""
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [f"{k} {tuple(state[k].shape)} (config: {tuple(v.shape)})" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        groups = (("missing", sorted(missing)), ("unexpected", sorted(unexpected)), ("of another shape", wrong))
        parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in groups if names]
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match its {CONFIG_NAME}: tensors {'; '.join(parts)}. "
                         "The two files come from different models: keep the pair one run or `msdd export` wrote")
    not_float = [f"{k} ({state[k].dtype})" for k, v in own.items() if v.is_floating_point()
                 and not state[k].is_floating_point()]
    if not_float:  # load_state_dict would cast them to float silently: a model of rounded weights
        raise ValueError(f"{directory / WEIGHTS_NAME} holds integer tensors where the model has float weights: "
                         f"{not_float[:5]}{' ...' if len(not_float) > 5 else ''}; re-export the model in float16/32 "
                         f"(msdd export)")
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:  # every decode would be NaN (a diverged run's weights, an fp16 export that overflowed)
        raise ValueError(f"{directory / WEIGHTS_NAME} holds NaN or infinite values in {len(not_finite)} tensor(s): "
                         f"{not_finite[:5]}{' ...' if len(not_finite) > 5 else ''}; every decode would be NaN. Use an "
                         "earlier checkpoint of the run, or export it in float32 (msdd export --dtype fp32)")


def model_card(meta: dict, evaluation: dict | None = None, repo_id: str = "") -> str:
    """A Hugging Face model card (README.md) from a model's `config.json` metadata and, when given, the
    JSON `msdd eval` wrote for it."""
    m = model_config_from_dict(meta["model"])
    family, r = m.family, m.image_size
    stage = {1: "stage 1 (the multi-step teacher)", 2: "stage 2 (the distilled one-step-per-stage student)"}
    floats = math.prod(m.latent_shape)
    shape = "(B, " + ", ".join(map(str, m.latent_shape)) + ")"
    lines = ["---", "library_name: msdd", "tags:", "- image-tokenizer", "- diffusion-decoder", f"- {family}",
             "pipeline_tag: image-to-image", "---", "", f"# {repo_id or 'msdd tokenizer'}", "",
             f"An msdd image tokenizer, family `{family}`, {stage.get(meta.get('stage'), 'a trained model')}: "
             f"{r} x {r} px RGB images <-> latents {shape} ({floats} floats, {3 * r * r / floats:.0f}x fewer "
             "numbers than the image).", "", "```python", "from msdd import Tokenizer", "",
             f"tok = Tokenizer.from_pretrained({repo_id!r})" if repo_id else "tok = Tokenizer.from_pretrained(PATH)",
             f"z = tok.encode(images)      # (B, 3, {r}, {r}) in [-1, 1]", "x = tok.decode(z)", "```", "",
             "## Training record", ""]
    record = {k: v for k, v in meta.items()
              if k not in ("format", "format_version", "model") and not isinstance(v, dict)}
    lines += [f"- {k}: {v}" for k, v in record.items()] or ["- (none stored)"]
    if evaluation:
        met, proto = evaluation.get("metrics", {}), evaluation.get("protocol", {})
        lines += ["", "## Evaluation", "", f"Protocol: {json.dumps(proto, sort_keys=True)}", "",
                  "| decoder | floats | PSNR (dB) | SSIM |", "|---|---|---|---|",
                  f"| this model | {floats} | {_number(met.get('psnr'), 2)} | {_number(met.get('ssim'), 4)} |"]
        lines += [f"| {b.get('method', k)} | {b.get('floats', '')} | {_number(b.get('psnr'), 2)} | "
                  f"{_number(b.get('ssim'), 4)} |" for k, b in evaluation.get("baselines", {}).items()]
        lines += [f"\n{k}: {_number(met[k], 4)}" for k in ("lpips", "rfid") if k in met]
    lines += ["", f"Files: `{CONFIG_NAME}` (architecture and training record), `{WEIGHTS_NAME}` (safetensors; no "
              "pickle). Written by `msdd push`.", ""]
    return "\n".join(lines)


def _number(value, digits: int) -> str:
    """A metric in a model card's table: the number to `digits` decimals, "-" where it was not measured."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def stage_for_hub(directory: str | Path, out: str | Path, repo_id: str = "", evaluation: dict | None = None) -> Path:
    """The folder `push_model` uploads: the model's two files and a generated README.md, in `out`."""
    src, out = Path(directory), Path(out)
    meta = read_model_metadata(src)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        atomic_write_bytes(out / name, (src / name).read_bytes())
    atomic_write_text(out / "README.md", model_card(meta, evaluation, repo_id))
    return out


def push_model(directory: str | Path, repo_id: str, private: bool = False, token: str | None = None,
               evaluation: dict | None = None, commit_message: str = "Upload msdd tokenizer") -> str:
    """Upload a model directory to the Hugging Face Hub repo `repo_id` (created if absent) with a generated
    model card; returns the commit URL. Refuses clearly when offline (HF_HUB_OFFLINE)."""
    import tempfile

    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it (and log in with "
                         "`hf auth login` (huggingface-cli login before huggingface_hub 0.34) or pass a token) to "
                         "upload")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_for_hub(directory, tmp, repo_id, evaluation)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(staged), commit_message=commit_message)
        except Exception as e:  # no network, no token, no write access, ...
            raise ValueError(f"upload to the Hub repo {repo_id!r} failed ({type(e).__name__}: {e}); check the "
                             "network and log in with `hf auth login` (huggingface-cli login before huggingface_hub "
                             "0.34) or pass a token") from None
    return str(getattr(info, "commit_url", info))
