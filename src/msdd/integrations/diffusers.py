"""msdd tokenizers as a diffusers model (`AutoencoderMSDD`), and conversions between msdd's model folders
(`config.json` + `model.safetensors`, see msdd.hub) and diffusers' (`config.json` with `_class_name` +
`diffusion_pytorch_model.safetensors`).

    from msdd import Tokenizer
    from msdd.integrations.diffusers import AutoencoderMSDD, export_diffusers, import_diffusers

    vae = AutoencoderMSDD.from_tokenizer(Tokenizer.from_pretrained("tiny-64-student"))
    z = vae.encode(images).latent_dist.mode()              # images (B, 3, R, R) in [-1, 1]
    z_norm = (z - vae.config.shift_factor) * vae.config.scaling_factor     # what a latent generator models
    x = vae.decode(z_norm / vae.config.scaling_factor + vae.config.shift_factor).sample
    vae.save_pretrained("out/vae"); vae = AutoencoderMSDD.from_pretrained("out/vae")

    export_diffusers("tiny-64-student", "out/vae")         # msdd model folder or bundled name -> diffusers
    import_diffusers("out/vae", "out/model")               # diffusers folder -> msdd model folder

diffusers is an optional dependency (`pip install "msdd[diffusers]"`); `import msdd` never imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from msdd.config import ModelConfig, model_config_from_dict, to_dict
from msdd.hub import FILE_METADATA, FORMAT, FORMAT_VERSION
from msdd.tokenizer import Tokenizer

try:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.utils import BaseOutput
except ImportError as e:
    raise ImportError('msdd.integrations.diffusers needs the diffusers package: pip install "msdd[diffusers]" '
                      f"({type(e).__name__}: {e})") from e

try:  # diffusers' own output classes (their modules since diffusers 0.26), so that isinstance checks hold
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError:  # pragma: no cover - older diffusers
    @dataclass
    class AutoencoderKLOutput(BaseOutput):
        latent_dist: Any

    @dataclass
    class DecoderOutput(BaseOutput):
        sample: torch.Tensor

__all__ = ["AutoencoderMSDD", "DeterministicLatent", "export_diffusers", "import_diffusers"]

# Tokenizer.metadata keys that the diffusers config holds elsewhere (msdd_config) or that no longer hold
# there (diffusers stores the weights in the model's own float32, whatever the msdd file's dtype was).


class DeterministicLatent:
    """The latent "distribution" of msdd's deterministic encoder: a point mass at z. `sample(generator)` and
    `mode()` both return z (pipelines call either), `std` is zero and `kl()` is zero."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    @property
    def mean(self) -> torch.Tensor:
        return self.z

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.z)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.z

    def mode(self) -> torch.Tensor:
        return self.z

    def kl(self, other: Any = None) -> torch.Tensor:
        return self.z.new_zeros(self.z.shape[0])


class AutoencoderMSDD(ModelMixin, ConfigMixin):
    """An msdd `Tokenizer` (any family: msdd, ssdd, plain) behind diffusers' autoencoder interface.

    Latent shape (`encode` -> `latent_dist.mode()`, what `decode` takes), from `msdd_config`:

    - msdd and plain, and ssdd with `ssdd.latent_kind: tokens`: 1-D tokens (B, L, C) =
      (B, latent_tokens, latent_dim), e.g. (B, 32, 8) for tiny-64. Not an image-shaped map: a generator
      over it is a sequence model, and pipelines that assume (B, C, H/8, W/8) latents do not fit.
    - ssdd with `ssdd.latent_kind: spatial`: the f8 map (B, ssdd.spatial_channels, H/8, W/8), f8c4 by
      default (ssdd-m-256: (B, 4, 32, 32)), like SD's VAE.

    The encoder is deterministic (`latent_dist.sample()` = `.mode()` = z); the decoder samples a flow, so
    `decode` takes a `generator` (None: msdd's fixed seed 0, the same image every call) and
    `num_inference_steps` (Euler steps per stage, see `decode`). Images are (B, 3, R, R) float in [-1, 1]
    at the model's size R = msdd_config["image_size"]; encode and decode run without gradients (train
    through `self.tokenizer.encoder` / `.decoder`).

    Latent scale, from the Tokenizer's per-channel statistics (`latent_mean`, `latent_std`, written by
    `msdd latent-stats`; zeros and ones when never measured): `scaling_factor` = 1 / mean(latent_std),
    `shift_factor` = mean(latent_mean), and `latents_mean` / `latents_std` the per-channel lists. As in
    diffusers' pipelines, a generator models `z_norm = (z - shift_factor) * scaling_factor` (about unit
    variance) and its output is mapped back with `z = z_norm / scaling_factor + shift_factor` before
    `decode`; per channel, `(z - latents_mean) / latents_std` is `self.tokenizer.normalize_latents(z)`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, msdd_config: dict, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 latents_mean: list | None = None, latents_std: list | None = None,
                 msdd_metadata: dict | None = None) -> None:
        """msdd_config: the `model` section of an msdd config as a dict (`msdd.config.to_dict(model_config)`,
        a ModelConfig is converted); msdd_metadata: the msdd model's training record (`Tokenizer.metadata`
        without its format and model keys), kept for `to_tokenizer` and `import_diffusers`."""
        super().__init__()
        if isinstance(msdd_config, ModelConfig):
            msdd_config = to_dict(msdd_config)
            self.register_to_config(msdd_config=msdd_config)
        self.tokenizer = Tokenizer(model_config_from_dict(json.loads(json.dumps(dict(msdd_config)))))

    # ------------------------------------------------------------------ msdd <-> diffusers objects

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "AutoencoderMSDD":
        """Wrap a Tokenizer (the same module: weights, buffers, device and metadata shared, not copied); the
        latent scale of the config comes from its `latent_mean` / `latent_std`."""
        mean = tok.latent_mean.detach().cpu().double()  # to the CPU first: MPS has no float64
        std = tok.latent_std.detach().cpu().double()
        meta = getattr(tok, "metadata", None)
        extra = None
        if isinstance(meta, dict):  # as JSON (the config file), anything else as its string
            extra = json.loads(json.dumps({k: v for k, v in meta.items() if k not in FILE_METADATA}, default=str))
        with torch.device("meta"):  # no second set of weights: the placeholder tokenizer is replaced below
            model = cls(msdd_config=to_dict(tok.config), scaling_factor=float(1.0 / std.mean()),
                        shift_factor=float(mean.mean()), latents_mean=mean.tolist(), latents_std=std.tolist(),
                        msdd_metadata=extra)
        model.tokenizer = tok
        return model.train(tok.training)

    def to_tokenizer(self) -> Tokenizer:
        """The wrapped Tokenizer (the same module, weights shared; `copy.deepcopy` it for a copy), with its
        msdd metadata (`tok.metadata`, as `Tokenizer.from_pretrained` sets it) when the config holds one."""
        tok = self.tokenizer
        extra = self.config.msdd_metadata
        if getattr(tok, "metadata", None) is None and extra is not None:
            tok.metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(tok.config),
                            **extra}
        return tok

    # ------------------------------------------------------------------ diffusers' autoencoder API

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, 3, R, R) in [-1, 1] (or uint8, PIL: as `Tokenizer.encode`) -> `AutoencoderKLOutput`
        whose `latent_dist` (a `DeterministicLatent`) gives z; `return_dict=False`: the tuple (latent_dist,)."""
        dist = DeterministicLatent(self.tokenizer.encode(x))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
               num_inference_steps: int | Sequence[int] | None = None, return_dict: bool = True, *,
               guidance: float | None = None):
        """Latents z (raw: undo the scaling first) -> `DecoderOutput` with `.sample` images (B, 3, R, R) in
        [-1, 1]; `return_dict=False`: the tuple (images,).

        generator: the source of all decoding noise, one for the batch or a list of one per image (None:
        msdd's default, seed 0); num_inference_steps: msdd's `steps`, Euler steps per stage as an int (every
        stage) or one per stage (ssdd: one stage; plain: ignored, one pass), None: the model's default (one
        per stage for a distilled student); guidance: the classifier-free guidance scale (None: the model's).
        """
        x = self.tokenizer.decode(z, num_inference_steps, guidance, generator)  # a list: each image its own noise
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, generator: torch.Generator | None = None, return_dict: bool = True):
        """A reconstruction: `decode(encode(sample).latent_dist.mode(), generator)`."""
        z = self.encode(sample).latent_dist.mode()
        return self.decode(z, generator=generator, return_dict=return_dict)


# ---------------------------------------------------------------------- folder conversions


def export_diffusers(model_path_or_name: str | Path, out_dir: str | Path) -> Path:
    """The msdd model at `model_path_or_name` (a model folder or a bundled name such as "tiny-64-student",
    as `Tokenizer.from_pretrained` resolves it) -> a diffusers folder `out_dir` for
    `AutoencoderMSDD.from_pretrained` (float32 weights; the msdd training record kept as msdd_metadata)."""
    AutoencoderMSDD.from_tokenizer(Tokenizer.from_pretrained(model_path_or_name)).save_pretrained(out_dir)
    out = Path(out_dir)
    mode = (out / "config.json").stat().st_mode & 0o777  # created as any file (the umask's permissions)
    for f in out.glob("*.safetensors"):  # diffusers writes the weights through a private (0600) temporary file
        f.chmod(mode)
    return out


def import_diffusers(diffusers_dir: str | Path, out_dir: str | Path) -> Path:
    """An `AutoencoderMSDD` folder (`save_pretrained` / `export_diffusers`) -> an msdd model folder `out_dir`
    (`Tokenizer.save_pretrained`, with the msdd metadata the diffusers config kept)."""
    tok = AutoencoderMSDD.from_pretrained(diffusers_dir).to_tokenizer()
    tok.save_pretrained(out_dir)  # with the record `to_tokenizer` put in its metadata
    return Path(out_dir)
