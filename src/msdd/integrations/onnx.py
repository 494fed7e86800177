"""msdd models as ONNX graphs, run with onnxruntime (issue 16, item 4).

`export_onnx(model, out_dir)` writes:

- `encoder.onnx`: images (B, 3, R, R) float in [-1, 1] -> latents z (B, L, C);
- `decoder.onnx`: the whole coarse-to-fine decode at a fixed schedule (the model's default: one Euler
  step per stage for a student) with its noise as inputs: z, `x0` (B, 3, r0, r0), the unit noise the
  first stage starts from, and `bn1` ... one 2x2 block noise per later stage (B, 3, r_s, r_s), the
  noise that renoises the upsampled image on entering stage s -> images (B, 3, R, R) in [-1, 1];
- `onnx.json`: the schedule, guidance, shapes and input names.

The batch dimension is dynamic. `OnnxTokenizer(out_dir)` runs both graphs with onnxruntime and draws
the noise from a torch generator in the order `msdd.flow.sampler.sample_multiscale` draws it, so the
same seed gives the PyTorch decode's image (up to float rounding). onnxruntime, onnx: `pip install
"msdd[onnx]"`. Multi-scale (msdd family) models only.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from msdd.flow.path import block_noise, randn, upsample_nearest
from msdd.flow.sampler import denoise_stage
from msdd.flow.schedule import local_times, stage_windows
from msdd.inputs import latent_values, model_images, noise_source
from msdd.io import atomic_write_text


def require_onnx(*modules: str) -> None:
    """An ImportError naming the pip command unless `modules` (default: onnx, which torch.onnx.export writes
    with) are installed; checked before anything is written or built."""
    missing = [m for m in (modules or ("onnx",)) if not _installed(m)]
    if missing:
        raise ImportError(f"{' and '.join(missing)} not installed: ONNX export and inference need the onnx extra, "
                          f'pip install "msdd[onnx]"')


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] is None: imports of it are blocked
        return False


class _DecodeGraph(nn.Module):
    """The decode of `sample_multiscale` with its noise as inputs, at a fixed schedule."""

    def __init__(self, decoder: nn.Module, windows, steps: Sequence[int], guidance: float) -> None:
        super().__init__()
        self.decoder, self.windows, self.steps, self.guidance = decoder, windows, steps, guidance

    def forward(self, z: torch.Tensor, x0: torch.Tensor, *block_noises: torch.Tensor) -> torch.Tensor:
        x = x0
        for w in self.windows:
            if w.index > 0:  # renoise, as flow.path.renoise with the drawn block noise
                x = w.alpha * upsample_nearest(x) + w.beta * block_noises[w.index - 1]
            x = denoise_stage(self.decoder, x, z, w, local_times(int(self.steps[w.index]), 1.0), self.guidance)
        return x.clamp(-1, 1)


class _EncodeGraph(nn.Module):
    def __init__(self, tok) -> None:
        super().__init__()
        self.encoder = tok.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).float()


def draw_noise(windows, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """x0 and the block noise of every later stage, drawn as `sample_multiscale` draws them."""
    x0 = randn((batch, 3, windows[0].resolution, windows[0].resolution), generator, torch.empty(0))
    return [x0] + [block_noise((batch, 3, w.resolution, w.resolution), w.gamma, generator, x0) for w in windows[1:]]


def export_decoder(decoder: nn.Module, windows, latent_shape: Sequence[int], steps: Sequence[int], guidance: float,
                   path: str | Path, opset: int = 17) -> list[str]:
    """The decode graph (see the module docstring) of a multi-scale `decoder` to `path`; its input names."""
    require_onnx()
    z = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))
    noise = draw_noise(windows, 2, torch.Generator().manual_seed(0))
    names = ["z", "x0"] + [f"bn{w.index}" for w in windows[1:]]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the fixed schedule is meant to be constant
        # the TorchScript exporter (dynamo=False): torch.export's needs onnxscript and traces the same graph
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_DecodeGraph(decoder, windows, steps, guidance), (z, *noise), str(path), dynamo=False,
                          opset_version=opset, input_names=names, output_names=["image"],
                          dynamic_axes={name: {0: "batch"} for name in names + ["image"]})
    return names


def export_onnx(model, out_dir: str | Path, steps: int | Sequence[int] | None = None,
                guidance: float | None = None, opset: int = 17) -> Path:
    """Write `encoder.onnx`, `decoder.onnx` and `onnx.json` for `model` (a Tokenizer, a model directory
    or a bundled name) to `out_dir`; steps / guidance: the decode's schedule (default: the model's)."""
    from msdd.tokenizer import Tokenizer

    require_onnx()
    tok = model if isinstance(model, Tokenizer) else Tokenizer.from_pretrained(model)
    if not tok.family.multi_scale:
        raise ValueError(f"ONNX export covers multi-scale (msdd family) models; this one is {tok.config.family!r}")
    tok = (copy.deepcopy(tok) if tok is model else tok).float().eval().cpu()  # the caller's model stays as it is
    steps, guidance = tok.resolve_steps(steps), tok.resolve_guidance(guidance)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx.json").unlink(missing_ok=True)  # written last: a folder without it is not loaded (a cut re-export)
    r, windows = tok.config.image_size, tok.windows
    images = torch.zeros(2, 3, r, r)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_EncodeGraph(tok), (images,), str(out / "encoder.onnx"), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["z"],
                          dynamic_axes={"images": {0: "batch"}, "z": {0: "batch"}})
    names = export_decoder(tok.decoder, windows, tok.config.latent_shape, steps, guidance, out / "decoder.onnx", opset)
    info = {"image_size": r, "latent_shape": list(tok.config.latent_shape), "steps": list(steps),
            "guidance": guidance, "stage_resolutions": [w.resolution for w in windows],
            "stage_gamma": [w.gamma for w in windows], "decoder_inputs": names, "opset": opset}
    atomic_write_text(out / "onnx.json", json.dumps(info, indent=2) + "\n")
    return out


class OnnxTokenizer:
    """`encoder.onnx` + `decoder.onnx` of `export_onnx` under onnxruntime, with `encode` / `decode` /
    `reconstruct` like `Tokenizer`'s (tensors in and out; noise from a torch generator, default seed 0)."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        require_onnx("onnxruntime")
        import onnxruntime as ort

        d = Path(directory)
        if not (d / "onnx.json").is_file():
            raise FileNotFoundError(f"{d} holds no onnx.json: pass a folder written by `msdd export --format onnx`")
        self.info = json.loads((d / "onnx.json").read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.encoder = ort.InferenceSession(str(d / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(d / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.windows = stage_windows(len(self.info["stage_resolutions"]), self.info["image_size"],
                                     self.info["stage_gamma"][-1])

    def encode(self, images) -> torch.Tensor:
        """Images (B, 3, R, R) (float in [-1, 1] or uint8, a tensor or array; checked as `Tokenizer.encode` checks
        them) -> latents (B, L, C)."""
        x = model_images(images, self.info["image_size"]).cpu()
        return torch.from_numpy(self.encoder.run(None, {"images": x.numpy()})[0])

    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None, seed: int = 0) -> torch.Tensor:
        """Latents (B, L, C) (checked as `Tokenizer.decode` checks them) -> images (B, 3, R, R); noise from
        `generator` (one, or a list of one per image) or a generator seeded with `seed`."""
        z = latent_values(z, tuple(self.info["latent_shape"]), spatial=False).cpu()
        generator = noise_source(generator, seed, z.shape[0])
        noise = draw_noise(self.windows, z.shape[0], generator)
        feed = dict(zip(self.info["decoder_inputs"], [z.numpy()] + [n.numpy() for n in noise]))
        return torch.from_numpy(np.asarray(self.decoder.run(None, feed)[0]))

    def reconstruct(self, images: torch.Tensor, **decode_kwargs) -> torch.Tensor:
        return self.decode(self.encode(images), **decode_kwargs)
