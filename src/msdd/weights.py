"""Pretrained files that some features need (LPIPS-VGG16, DINO ViT-S/16, Inception for FID, DINOv2
ViT-S/14 for the REPA loss of the SSDD family).

Nothing here downloads implicitly: a file is taken from an explicit path, else from an environment
variable, else from the standard torch hub cache (`$TORCH_HOME/hub/checkpoints`, where torchvision,
torch-fidelity and DINO's hub entry keep them), else (DINO, DINOv2) from the Hugging Face cache of timm.
When it is absent the error names the file, where we looked, the option to pass and how to fetch it
(`msdd fetch-weights NAME`, online).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PretrainedFile:
    name: str
    filename: str
    env: str
    option: str
    purpose: str
    url: str
    hf_repo: str | None = None  # also found in the Hugging Face cache under this repo (timm's copy)
    hf_file: str = "model.safetensors"


PRETRAINED = {
    f.name: f
    for f in (
        PretrainedFile("vgg16", "vgg16-397923af.pth", "MSDD_VGG16_WEIGHTS", "--vgg-weights",
                       "the LPIPS perceptual loss/metric (VGG16 ImageNet backbone)",
                       "https://download.pytorch.org/models/vgg16-397923af.pth"),
        PretrainedFile("dino_vits16", "dino_deitsmall16_pretrain.pth", "MSDD_DINO_WEIGHTS", "--dino-weights",
                       "the DINO ViT-S/16 discriminator",
                       "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
                       hf_repo="timm/vit_small_patch16_224.dino"),
        PretrainedFile("dinov2_vits14", "dinov2_vits14_pretrain.pth", "MSDD_DINOV2_WEIGHTS", "--dinov2-weights",
                       "the REPA loss of the SSDD family (DINOv2 ViT-S/14 features; model.ssdd.repa_weight)",
                       "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
                       hf_repo="timm/vit_small_patch14_dinov2.lvd142m"),
        PretrainedFile("inception", "weights-inception-2015-12-05-6726825d.pth", "MSDD_INCEPTION_WEIGHTS",
                       "--inception-weights", "rFID (torch-fidelity's Inception-v3 FID network)",
                       "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                       "weights-inception-2015-12-05-6726825d.pth"),
    )
}


def cache_path(spec: PretrainedFile) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.filename


def resolve_weights(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """Path of pretrained file `name` (see PRETRAINED) or a FileNotFoundError that says how to get it."""
    spec = PRETRAINED[name]
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"{spec.option} {p}: no such file (expected {spec.filename}, for {spec.purpose})")
        return p
    env = os.environ.get(spec.env)
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"${spec.env}={p}: no such file (expected {spec.filename}, for {spec.purpose})")
        return p
    p = cache_path(spec)
    if p.is_file():
        return p
    if spec.hf_repo is not None:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec.hf_repo, spec.hf_file)
        if isinstance(hit, str):
            return Path(hit)
    raise FileNotFoundError(
        f"{spec.purpose} needs the pretrained file {spec.filename}, which is not in the cache ({p}). "
        f"Pass its path with {spec.option} PATH (or set ${spec.env}), or, when online, run "
        f"`msdd fetch-weights {spec.name}` to download it from {spec.url}"
    )


def fetch_weights(name: str) -> Path:
    """Download pretrained file `name` into the torch hub cache (explicit, online only)."""
    spec = PRETRAINED[name]
    dest = cache_path(spec)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(spec.url, str(dest), progress=True)
        except OSError as e:  # urllib's URLError and HTTPError included: offline, refused, not found
            reason = getattr(e, "reason", None) or e.strerror or e
            raise ValueError(f"could not download {name} from {spec.url} ({reason}); check the network, or fetch "
                             f"the file elsewhere and copy it to {dest} (or pass it with {spec.option})") from None
    return dest


def load_tensor_file(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """The state dict in pretrained file `name` (PRETRAINED) at `path`: a .safetensors file, or a torch
    file holding tensors only (weights_only=True). Anything else (pickled code, a damaged file) is a
    ValueError naming the file and the option, never loaded with weights_only=False."""
    spec = PRETRAINED[name]
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError from a damaged zip, SafetensorError
        raise ValueError(f"{spec.option} {path} is not a plain tensor state dict ({type(e).__name__}); refusing to "
                         f"load it: give {spec.filename} ({spec.url}) or its .safetensors conversion") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{spec.option} {path} holds a {type(state).__name__}, not a state dict of tensors: "
                         f"give {spec.filename} ({spec.url})")
    return state


def build_loss_network(build, device, turn_off: str) -> torch.nn.Module:
    """`build()` (a network that reads a pretrained file) on `device`. A missing file raises the
    loader's FileNotFoundError with `turn_off` added: the setting that trains without this loss."""
    try:
        return build().to(device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}\n({turn_off})") from None


def unused_file(option: str, path: str | os.PathLike | None, why: str) -> None:
    """Warn when a pretrained-weights option was given for a loss this run does not compute (it would be
    ignored without a word, and the user would think the loss is on)."""
    if path is not None:
        warnings.warn(f"{option} {path} is not used: {why}", stacklevel=3)


def wrong_file(name: str, path: str | os.PathLike, error: Exception) -> ValueError:
    """The error for a file of pretrained `name` that holds tensors of another network (a state dict whose keys or
    shapes do not fit): names the option, the file and the one it expects, without the key lists."""
    spec = PRETRAINED[name]
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{spec.option} {path} does not hold the weights of {spec.purpose} ({first[:160]}); give "
                      f"{spec.filename} ({spec.url})")
