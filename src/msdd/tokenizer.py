"""The library API: `Tokenizer` = encoder + decoder + latent statistics, for every model family.

    tok = Tokenizer.from_pretrained("path/to/model")        # or Tokenizer(model_config)
    z = tok.encode(images)                                  # (B, 3, R, R) in [-1, 1] -> (B, L, C)
    x = tok.decode(z, steps=[10, 10, 10, 10], guidance=1.0, generator=torch.Generator().manual_seed(0))
    tok.save_pretrained("out/model")

`images` may also be uint8 tensors (B, 3, R, R), a PIL image or a list of PIL images (centre-cropped
to the model resolution). A distilled student (`config.one_step`) decodes with one step per stage by
default.

`config.family` picks the family object (`msdd.families`: msdd, ssdd, plain) that builds the encoder/decoder
pair and owns the latent shape, the decode schedule, the decode and the training loss; `Tokenizer` holds
the networks and the latent statistics and checks inputs.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from msdd.config import ModelConfig, model_config_from_dict
from msdd.families import Decoded, family_of
from msdd.flow.schedule import StageWindow
from msdd.hub import (
    FILE_METADATA,
    WEIGHTS_NAME,
    check_weights,
    file_sha256,
    read_model_metadata,
    read_weights,
    resolve_model_dir,
    save_tokenizer,
)
from msdd.inputs import (
    check_flags, check_seed, image_batch, image_values, latent_values, model_images, noise_source, user_stacklevel,
)  # fmt: skip
from msdd.models import caches
from msdd.models.precision import WeightCopies, encode_kwargs, msdd_int8


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on `device` when asked, else a no-op context."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (a GPU's kernels run after the call that queued them returns): around a
    timed call. Nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warn_without_gradients(x, method: str, instead: str) -> None:
    """encode / decode run without autograd (the fast inference path): say so when given a tensor that requires
    grad, whose gradient would otherwise be missing without a word."""
    if isinstance(x, torch.Tensor) and x.requires_grad:
        warnings.warn(f"Tokenizer.{method} runs without gradients: its output does not require grad. To backpropagate "
                      f"through it, use {instead}", stacklevel=user_stacklevel())


def _renamed_guidance(guidance: float | None, cfg: float | None, stacklevel: int) -> float | None:
    """`cfg=`, the old name of `guidance=` in `decode` / `reconstruct`: still accepted, with a warning
    pointing `stacklevel` frames up (at the caller)."""
    if cfg is None:
        return guidance
    if guidance is not None:
        raise TypeError("pass the guidance scale once, as guidance= (cfg= is its deprecated name)")
    warnings.warn("cfg= is deprecated: the guidance scale is now guidance= (the command line keeps --cfg)",
                  DeprecationWarning, stacklevel=stacklevel)
    return cfg


class Tokenizer(nn.Module):
    """The encoder and decoder that the config's family builds, with the latent statistics; decoding and
    the training loss are the family's (`self.family`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.family = family_of(config)
        self.encoder, self.decoder = self.family.build()
        # Per-channel statistics of z over a dataset (`msdd latent-stats`), for downstream models.
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))
        self._warned_steps = False
        self._copies = WeightCopies()  # bf16 / int8 copies of the encoder and decoder for bf16= / int8= calls
        self._values = caches.ValuesCheck()  # sees edits of the weights that leave no version (msdd.models.caches)

    # ------------------------------------------------------------------ properties

    @property
    def windows(self) -> tuple[StageWindow, ...]:
        return self.family.windows

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def default_steps(self) -> tuple[int, ...]:
        """Euler steps per stage of a default decode; (N,) for ssdd, (1,) for plain (one pass)."""
        return self.family.default_steps()

    def passes_per_image(self, steps: Sequence[int], guidance: float) -> int:
        """Decoder forward passes per image of a decode (msdd guidance other than 0 or 1 doubles them)."""
        return self.family.passes_per_image(steps, guidance)

    # ------------------------------------------------------------------ input checks

    def check_float32(self) -> None:
        """msdd computes in float32 (bf16 only under autocast): weights cast with `.half()` / `.bfloat16()`
        would meet float32 inputs and fail deep inside a layer."""
        other = next(((name, p.dtype) for name, p in self.named_parameters() if p.dtype != torch.float32), None)
        if other is not None:
            raise ValueError(f"this Tokenizer's weights are {other[1]} ({other[0]} and maybe more); msdd encodes and "
                             "decodes in float32: call tok.float(), and pass bf16=True to encode/decode for "
                             "reduced-precision compute")

    def prepare_images(self, images) -> torch.Tensor:
        """Any accepted image input -> float (B, 3, R, R) in [-1, 1] on the model's device."""
        self.check_float32()
        return model_images(images, self.config.image_size).to(self.device)

    def _as_batch(self, images, crop: bool):
        """PIL image(s), array or tensor -> a tensor (B, 3, H, W) as given, or a list of (1, 3, H, W) tensors
        (`msdd.inputs.image_batch`)."""
        self.check_float32()
        return image_batch(images, self.config.image_size, crop)

    def _checked_values(self, images: torch.Tensor) -> torch.Tensor:
        """A (B, 3, H, W) batch: uint8 in [0, 255] or float in [-1, 1] -> float32 in [-1, 1] on the device."""
        return image_values(images).to(self.device)

    def check_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape), or one latent, as finite float32 on the device (`msdd.inputs`)."""
        self.check_float32()
        return latent_values(z, self.config.latent_shape, self.config.spatial_latent).to(self.device)

    def resolve_steps(self, steps: int | Sequence[int] | None) -> tuple[int, ...]:
        """Euler steps per stage of a decode: the model's by default, else whole numbers checked (1.7, a
        bool or a string is a ValueError, never truncated to an int)."""
        steps = self.family.resolve_steps(steps)
        if self.config.one_step and any(n > 1 for n in steps) and not self._warned_steps:
            warnings.warn(f"this decoder was distilled for one step per stage; decoding with {list(steps)}",
                          stacklevel=user_stacklevel())
            self._warned_steps = True
        return steps

    def resolve_guidance(self, guidance: float | None) -> float:
        """The guidance scale of a decode: the model's by default; plain ignores it; ssdd has none."""
        return self.family.resolve_guidance(guidance)

    # ------------------------------------------------------------------ API

    @torch.no_grad()
    def encode(self, images, bf16: bool = False, *, int8: bool = False) -> torch.Tensor:
        """Images -> latents z (B, L, C), or (B, c, R/8, R/8) for a spatial latent (raw; see
        `normalize_latents`). bf16: bf16 compute; int8 (CPU): the transformer streams' matmuls in int8, as in
        `decode`. Without gradients: `self.encoder(x)` is the differentiable encoder."""
        check_flags(bf16=bf16, int8=int8)
        _warn_without_gradients(images, "encode", "tok.encoder(x) on images x in [-1, 1]")
        x = self.prepare_images(images)
        with autocast(x.device, bf16):
            return self.inference_module(self.encoder, bf16, int8, x.device)(x).float()

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        steps: int | Sequence[int] | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        bf16: bool = False,
        return_stages: bool = False,
        *,
        cfg: float | None = None,
        int8: bool = False,
    ) -> torch.Tensor:
        """Latents (see `encode`) -> images (B, 3, R, R) in [-1, 1].

        steps: Euler steps per stage (int or list; default: the model's own schedule); guidance: the
        classifier-free guidance scale, the paper's cfg (default: the model's; `cfg=` is its deprecated
        name); generator: source of all noise (default: a CPU generator seeded with `seed`, so the same
        call gives the same image). bf16: bf16 compute; int8 (CPU): the transformer streams' matmuls
        in int8 (`msdd.models.precision.quantise_int8`), the rest float32 (bf16 with bf16=True, where msdd's
        CPU kernels run). Without gradients: `sample` is the differentiable decode. The image at the end of every
        stage: `decode_stages` (`return_stages=True` is its deprecated form here).
        """
        guidance = _renamed_guidance(guidance, cfg, stacklevel=4)  # past torch.no_grad's wrapper
        check_flags(return_stages=return_stages)
        decoded = self.decode_stages(z, steps, guidance, generator, seed, bf16, int8=int8)
        if return_stages:
            warnings.warn("decode(return_stages=True) is deprecated: decode_stages(z, ...) returns the images and the "
                          "image at the end of every stage (a NamedTuple: .images, .stages)", DeprecationWarning,
                          stacklevel=user_stacklevel())
            return decoded
        return decoded.images

    @torch.no_grad()
    def decode_stages(self, z: torch.Tensor, steps: int | Sequence[int] | None = None, guidance: float | None = None,
                      generator: torch.Generator | None = None, seed: int = 0, bf16: bool = False, *,
                      int8: bool = False) -> Decoded:
        """`decode` that also keeps the image at the end of every stage (the progressive previews; ssdd and
        plain: the final image alone): `Decoded(images, stages)`, every image clamped to [-1, 1]."""
        _warn_without_gradients(z, "decode", "tok.sample(z, steps, guidance, generator)")
        check_flags(bf16=bf16, int8=int8)
        z = self.check_latents(z)
        steps = self.resolve_steps(steps)
        guidance = self.resolve_guidance(guidance)
        generator = noise_source(generator, seed, z.shape[0])
        decoder = self.inference_module(self.decoder, bf16, int8, z.device)
        with autocast(z.device, bf16):
            x, stages = self.family.sample(decoder, z, steps, guidance, generator)
        return Decoded(x.clamp(-1, 1), [stage.clamp(-1, 1) for stage in stages])

    def forget_caches(self) -> None:
        """Drop what the fast inference path keeps for the weights (packed weights, modulation vectors, bf16 / int8
        copies). Not needed after an optimiser step, `load_state_dict`, `.to()` or edits through `p.data` (each call
        checks a sample of the weights' values, `msdd.models.caches`); only after an edit of a few values in place."""
        for module in (self.encoder, self.decoder):
            caches.forget(module)
            self._copies.forget(module)

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda(): the caches hold the old tensors' memory
        self._values, self._copies = caches.ValuesCheck(), WeightCopies()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) carry no reduced-precision copies of this one's modules
        return {**super().__getstate__(), "_copies": WeightCopies(), "_values": caches.ValuesCheck()}

    def inference_module(self, module: nn.Module, bf16: bool, int8: bool = False,
                         device: torch.device | None = None) -> nn.Module:
        """`module` (the encoder or the decoder) for a call without gradients; with bf16, a copy of it with
        its matmul weights stored in bf16 (`msdd.models.precision`): the same results under autocast
        without casting every weight on every call (half the module's float32 size); with int8 (CPU), a
        copy with the transformer streams' matmuls in int8 (and with bf16 too, its other weights in bf16). Copies
        are kept and rebuilt when the weights change."""
        if self._values.changed(module):  # an edit no version counter tells of: every cache of the module is stale
            caches.forget(module)
            self._copies.forget(module)
        if int8:
            if device is not None and device.type != "cpu":
                raise ValueError(f"int8=True runs on the CPU: pass a CPU model (this one is on {device}), or drop int8")
            if bf16 and not msdd_int8():
                raise ValueError("int8=True with bf16=True needs msdd's CPU kernels (AVX512-BF16 and VNNI, a C++ "
                                 "compiler); PyTorch's int8 layers used here run in float32: pass bf16=False")
            return self._copies.of(module, "int8-bf16" if bf16 else "int8")
        return self._copies.of(module, "bf16") if bf16 else module

    def sample(self, z: torch.Tensor, steps: Sequence[int], guidance: float, generator) -> Decoded:
        """The decode of this model's family on checked latents, without clamping or `no_grad`: the images and the
        image at the end of every stage."""
        return self.family.sample(self.decoder, z, steps, guidance, generator)

    def training_loss(self, images: torch.Tensor, generator, perceptual: nn.Module | None = None,
                      repa: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage-1 loss of this model's family on images (B, 3, R, R) in [-1, 1] (encoder and decoder
        trained jointly). Returns (loss, {name: detached value}) for logging."""
        z = self.encoder(images)
        return self.family.loss(self.decoder, images, z, generator, perceptual=perceptual, repa=repa)

    def init_linear_path(self, pca) -> None:
        """Start the linear path (config.linear_path) as the PCA code `pca` (msdd.models.linear.fit_pca
        with latent_tokens * latent_dim components, on flattened images in [-1, 1])."""
        from msdd.models.linear import init_linear_path

        if not self.config.uses_linear_path:
            raise ValueError("this model has no linear path (model.linear_path=false, or an SSDD spatial latent)")
        init_linear_path(self.encoder.to_linear, self.decoder.from_linear, pca)

    def reconstruct(self, images, tile_overlap: int | None = None, **decode_kwargs):
        """`decode(encode(images))`; `decode_kwargs` are `decode`'s (`bf16` and `int8` apply to both).

        Images of the model's size R go through as one batch (PIL images are centre-cropped to R, as in
        `encode`). A tensor or array (B, 3, H, W) of another size, or any input when `tile_overlap` is
        given, is reconstructed at its own size from overlapping R x R tiles (`msdd.tiles`; overlap
        default R // 4; a side shorter than R is padded by reflection and cropped back): a tensor in gives
        a tensor (B, 3, H, W), a list of PIL images gives a list of (3, H, W) tensors."""
        if "cfg" in decode_kwargs:
            decode_kwargs["guidance"] = _renamed_guidance(decode_kwargs.pop("guidance", None), decode_kwargs.pop("cfg"),
                                                          stacklevel=3)
        prepared = self._reconstruct_input(images, tile_overlap)
        if isinstance(prepared, torch.Tensor):  # one batch at the model's size
            return self.decode(self.encode(prepared, **encode_kwargs(decode_kwargs)), **decode_kwargs)
        from msdd.tiles import reconstruct_tiled

        seed = check_seed(decode_kwargs.pop("seed", 0))
        if decode_kwargs.pop("generator", None) is not None or decode_kwargs.get("return_stages"):
            raise ValueError("a tiled reconstruction seeds every tile from `seed` and returns the final images: "
                             "pass seed=, not generator= or return_stages=")
        out = [reconstruct_tiled(self, x, tile_overlap, key=i, seed=seed, **decode_kwargs)
               for i, x in enumerate(prepared)]
        out = [x.to(self.device) for x in out]  # tiles are put together on the CPU
        return torch.stack(out) if isinstance(images, (torch.Tensor, np.ndarray)) else out

    def _reconstruct_input(self, images, tile_overlap: int | None) -> torch.Tensor | list[torch.Tensor]:
        """What `reconstruct` decodes: a checked batch (B, 3, R, R), or the images to tile as a list of
        (3, H, W) tensors in [-1, 1] (each input converted once)."""
        from msdd.tiles import check_overlap

        r = self.config.image_size
        if tile_overlap is not None:
            check_overlap(tile_overlap, r)
        batch = self._as_batch(images, crop=tile_overlap is None)
        if isinstance(batch, list):
            return [self._checked_values(x)[0].cpu() for x in batch]
        if tile_overlap is None and batch.shape[-2:] == (r, r):
            return self.prepare_images(batch)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(batch.shape)}")
        return list(self._checked_values(batch).cpu())

    def _per_channel(self, stat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """`stat` (channels,) laid out to broadcast over latents z, whose channel axis is checked: the last one of
        token latents (B, L, C) or any (..., C), the third from last of spatial ones (B, C, h, w)."""
        spatial, c = self.config.spatial_latent, self.config.latent_channels
        axis = -3 if spatial else -1
        if not isinstance(z, torch.Tensor) or z.ndim < -axis or z.shape[axis] != c:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must have their {c} channels {'at dim -3 (B, C, h, w)' if spatial else 'last'} "
                             f"for this model, got {got}")
        stat = stat.to(z.device)  # latents kept on the CPU (a saved dataset) with a model on a GPU
        return stat.view(-1, 1, 1) if spatial else stat  # channels first for a spatial latent

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._per_channel(self.latent_mean, z)) / self._per_channel(self.latent_std, z)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._per_channel(self.latent_std, z) + self._per_channel(self.latent_mean, z)

    # ------------------------------------------------------------------ I/O (files: msdd.hub)

    def save_pretrained(self, directory, **extra_metadata) -> None:
        """Write config.json and model.safetensors (float32) to `directory`. A model loaded with `from_pretrained`
        keeps its training record (stage, steps_trained, ...: `metadata`), with `extra_metadata` over it; what
        described the file it was loaded from (its dtype, the hash of the model it was exported from) is dropped."""
        record = {k: v for k, v in (getattr(self, "metadata", None) or {}).items() if k not in FILE_METADATA}
        save_tokenizer(self, directory, **{**record, **extra_metadata})

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    evaluation: dict | None = None) -> str:
        """Upload this model (config.json, model.safetensors, a model card from its metadata and the
        `msdd eval` JSON `evaluation` when given) to the Hugging Face Hub; returns the commit URL."""
        import tempfile

        from msdd.hub import push_model

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_model(tmp, repo_id, private=private, token=token, evaluation=evaluation)

    @classmethod
    def from_pretrained(cls, path=None, device: str | torch.device = "cpu") -> "Tokenizer":
        """The model at `path`: a model directory, a bundled name (default: the bundled student) or a
        Hugging Face repo id (see `msdd.hub.resolve_model_dir`)."""
        directory = resolve_model_dir(path)
        meta = read_model_metadata(directory)
        tok = cls(model_config_from_dict(meta["model"]))
        state = read_weights(directory / WEIGHTS_NAME)
        check_weights(directory, tok.state_dict(), state)
        tok.load_state_dict(state)
        tok.metadata = meta
        return tok.to(device).eval()


def export_tokenizer(source: str | Path, destination: str | Path, dtype: str = "fp16") -> Path:
    """Copy the model at `source` to `destination` with its weights stored as `dtype` (fp16 halves the file;
    the metadata keeps the source's training record and names the source file's sha256)."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(dtypes)} (the type the weights are stored in)")
    tok = Tokenizer.from_pretrained(source)
    extra = {k: v for k, v in tok.metadata.items() if k not in FILE_METADATA}
    extra.update(weights_dtype=dtype, exported_from_sha256=file_sha256(resolve_model_dir(source) / WEIGHTS_NAME))
    return save_tokenizer(tok, destination, dtype=dtypes[dtype], **extra)
