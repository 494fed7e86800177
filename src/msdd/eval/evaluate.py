"""`msdd eval`: reconstruction metrics with the protocol written into the result (SPEC 8).

Protocol: every image is ADM centre-cropped to the model resolution (resize the shorter side, crop);
the reference for every metric is that same crop as uint8; reconstructions are rounded to uint8 too
(what a saved PNG holds). PSNR and SSIM on [0, 1] with data_range 1 (torchmetrics), LPIPS-VGG16
(v0.1 linear heads), rFID with torchmetrics' FrechetInceptionDistance on torch-fidelity's
Inception-v3 (2048-d pool features) between the reconstructions and the same cropped originals.
Metrics whose pretrained file is absent are skipped and reported, never approximated.

Under torchrun each process reconstructs a shard (images rank, rank + world, ...); torchmetrics
states are summed across processes before `compute()`.
"""

from __future__ import annotations

import importlib
import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, SumMetric

from msdd.data import ImageFolderDataset, embedded_eval_set, to_uint8
from msdd.dist import DistInfo
from msdd.eval.baselines import default_pca_crops, pca_baseline, pca_for_source
from msdd.eval.metrics import (
    SSIM_CONVENTION, bicubic_baseline, bicubic_side, psnr_per_image, quantize, ssim_per_image,
)
from msdd.hub import WEIGHTS_NAME, file_sha256, resolve_model_dir
from msdd.seeding import image_generators
from msdd.tokenizer import Tokenizer, autocast, synchronize
from msdd.weights import load_tensor_file, resolve_weights, wrong_file

PUBLISHED_FID_IMAGES = 50_000


def build_fid(weights: str | Path | None, device) -> tuple[object | None, str | None]:
    """(FrechetInceptionDistance metric, None) or (None, reason it is skipped)."""
    try:
        path = resolve_weights("inception", weights)
    except FileNotFoundError as e:
        return None, str(e)
    try:
        importlib.import_module("torch_fidelity")  # torchmetrics' FID runs on it; imported only to check
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None, "rFID needs torch-fidelity: pip install 'msdd[fid]'"
    # torch-fidelity unpickles the file without weights_only; we first prove it holds only tensors.
    load_tensor_file(path, "inception")
    try:
        fid = FrechetInceptionDistance(feature=2048, reset_real_features=True, feature_extractor_weights_path=str(path))
    except RuntimeError as e:  # tensors of another network
        raise wrong_file("inception", path, e) from None
    return fid.to(device), None


def build_lpips(weights: str | Path | None, device) -> tuple[torch.nn.Module | None, str | None]:
    from msdd.models.perceptual import LPIPS

    try:
        return LPIPS(weights).to(device), None
    except FileNotFoundError as e:
        return None, str(e)


def eval_images(source: str, resolution: int, limit: int | None = None):
    """A dataset of (image, name, reason) records: the embedded held-out set or a folder (centre crop)."""
    if source == "embedded":
        images, names = embedded_eval_set(resolution)
        records = [(x, n, None) for x, n in zip(images, names)][:limit]
        return records
    return ImageFolderDataset(source, resolution, train=False, limit=limit)


class _Indexed(torch.utils.data.Dataset):
    """The records of `data` at `indices`, each with its global index (to seed its own noise)."""

    def __init__(self, data, indices) -> None:
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return self.data[self.indices[k]], self.indices[k]


def _collate_indexed(batch):
    """-> (images (B', 3, R, R), their global indices, number of bad files skipped)."""
    good = [(rec[0], i) for rec, i in batch if rec[0] is not None]
    for rec, _ in batch:
        if rec[0] is None:
            warnings.warn(f"skipping {rec[1]}: {rec[2]}")
    images = torch.stack([x for x, _ in good]) if good else torch.empty(0)
    return images, [i for _, i in good], len(batch) - len(good)


@torch.no_grad()
def evaluate(
    tok: Tokenizer,
    source: str,
    *,
    steps: int | Sequence[int] | None = None,
    guidance: float | None = None,
    seed: int = 0,
    bf16: bool = False,
    int8: bool = False,
    batch_size: int = 32,
    limit: int | None = None,
    inception_weights: str | Path | None = None,
    vgg_weights: str | Path | None = None,
    dist_info: DistInfo = DistInfo(),
    model_path: str | Path | None = None,
    pca_source: str | None = "embedded",
) -> dict:
    """Metrics of `tok` on `source`, with the protocol; beside them (`baselines`) the PSNR/SSIM of
    bicubic down/up and of PCA (fitted on training crops of `pca_source`, None to skip) with as many
    floats as the latent, on the same images. `int8`: decode with int8 matmuls (`Tokenizer.decode(int8=True)`)."""
    device = tok.device
    floats = math.prod(tok.config.latent_shape)
    steps = tok.resolve_steps(steps)  # argument errors first, before any PCA fit or image decode
    guidance = tok.resolve_guidance(guidance)
    if limit is not None and limit < 1:
        raise ValueError(f"no usable image found in {source} with limit={limit}: the limit must be >= 1 (or left "
                         "out for every image)")
    data = eval_images(source, tok.config.image_size, limit)
    pca = pca_for_source(pca_source, tok.config.image_size, floats) if pca_source else None
    shard = range(dist_info.rank, len(data), dist_info.world_size)
    loader = DataLoader(_Indexed(data, shard), batch_size=batch_size, collate_fn=_collate_indexed)

    metrics = {name: MeanMetric().to(device) for name in ("psnr", "ssim", "lpips", "decode_seconds", "bicubic_psnr",
                                                          "bicubic_ssim", "pca_psnr", "pca_ssim")}
    count, skipped_files = SumMetric().to(device), SumMetric().to(device)  # summed over processes
    count.update(0.0)  # a defined 0 when no image reaches the loop (checked below)
    skipped_files.update(0.0)
    fid, fid_skip = build_fid(inception_weights, device)
    lpips, lpips_skip = build_lpips(vgg_weights, device)
    first_batch, timed = None, 0  # the first batch's decode time: it builds kernels and warms caches, so apart
    for images, indices, n_skipped in loader:
        skipped_files.update(float(n_skipped))
        if len(images) == 0:
            continue
        ref = quantize(images).to(device)  # the cropped originals as uint8 values, in [-1, 1]
        z = tok.encode(ref, bf16=bf16)
        # one generator per image, seeded by its index: results do not depend on batch size or processes
        g = image_generators(seed, [int(i) for i in indices])
        synchronize(device)  # the model's GPU, not the current one
        t0 = time.perf_counter()
        recon = tok.decode(z, steps=steps, guidance=guidance, generator=g, bf16=bf16, int8=int8)
        synchronize(device)
        seconds = torch.tensor((time.perf_counter() - t0) / len(images))
        if first_batch is None:
            first_batch = (seconds, len(images))
        else:
            metrics["decode_seconds"].update(seconds, weight=len(images))
            timed += 1
        recon = quantize(recon)
        metrics["psnr"].update(psnr_per_image(recon, ref))
        metrics["ssim"].update(ssim_per_image(recon, ref))
        count.update(float(len(images)))
        baselines = [("bicubic", bicubic_baseline(ref, floats))]
        if pca is not None:
            baselines.append(("pca", pca_baseline(pca, ref)))
        for name, base in baselines:
            metrics[f"{name}_psnr"].update(psnr_per_image(base, ref))
            metrics[f"{name}_ssim"].update(ssim_per_image(base, ref))
        if lpips is not None:
            with autocast(device, bf16):
                metrics["lpips"].update(lpips(recon, ref).float())
        if fid is not None:
            fid.update(to_uint8(ref), real=True)
            fid.update(to_uint8(recon), real=False)

    if timed == 0 and first_batch is not None:  # one batch: its time is all there is
        metrics["decode_seconds"].update(first_batch[0], weight=first_batch[1])
    total = int(count.compute().item())
    if total == 0:  # every metric would be NaN
        raise ValueError(f"no usable image found in {source}: all {len(data)} files were skipped as unreadable or "
                         "too small (see the warnings above); re-save them as ordinary PNG/JPEG files or point --data "
                         "at another folder")
    out_metrics = {"psnr": metrics["psnr"].compute().item(), "ssim": metrics["ssim"].compute().item()}
    skipped = {}
    warns = []
    if lpips is not None:
        out_metrics["lpips"] = metrics["lpips"].compute().item()
    else:
        skipped["lpips"] = lpips_skip
    if fid is not None and total < 2:
        skipped["rfid"] = f"rFID needs at least 2 images (their feature covariance); {total} was scored"
    elif fid is not None:
        out_metrics["rfid"] = fid.compute().item()
        if total < PUBLISHED_FID_IMAGES:
            warns.append(f"rFID on {total} images is not comparable to published rFID (which uses "
                         f"{PUBLISHED_FID_IMAGES:,} ImageNet validation images)")
    else:
        skipped["rfid"] = fid_skip
    side = bicubic_side(floats)
    baselines_out = {"bicubic": {"psnr": metrics["bicubic_psnr"].compute().item(),
                                 "ssim": metrics["bicubic_ssim"].compute().item(), "floats": 3 * side * side,
                                 "method": f"bicubic down to {side}x{side} and back up"}}
    if pca is not None:
        baselines_out["pca"] = {"psnr": metrics["pca_psnr"].compute().item(),
                                "ssim": metrics["pca_ssim"].compute().item(),
                                "floats": floats, "method": f"PCA, {floats} components fitted on "
                                f"{default_pca_crops()} training crops of {pca_source}"}
    infinite = [name for name, v in out_metrics.items() if not math.isfinite(v)] + [
        f"{b} {name}" for b, d in baselines_out.items() for name in ("psnr", "ssim") if not math.isfinite(d[name])]
    if infinite:
        warns.append(f"{', '.join(infinite)} not finite: an image was reconstructed exactly (a flat image's PSNR is "
                     "infinite), so the mean is too; the JSON holds null")
    for w in warns:
        warnings.warn(w)
    return {
        "metrics": out_metrics,
        "baselines": baselines_out,
        "skipped_metrics": skipped,
        "warnings": warns,
        "decode_seconds_per_image": metrics["decode_seconds"].compute().item(),
        "img_per_s": 1.0 / max(metrics["decode_seconds"].compute().item(), 1e-12),
        "protocol": {
            "images": total,
            "skipped_files": int(skipped_files.compute().item()),
            "data": source,
            "crop": (f"the embedded held-out set at {tok.config.image_size} px: each photo's ADM centre crop and its "
                     "centre square cut into 2x2 and 3x3 tiles (msdd.data.embedded_eval_set)" if source == "embedded"
                     else f"ADM centre crop to {tok.config.image_size} (resize shorter side, crop)"),
            "reference": "the same centre-cropped originals, as uint8",
            "reconstructions": "rounded to uint8",
            "steps_per_stage": list(steps),
            "cfg": guidance,
            "decoder_passes_per_image": tok.passes_per_image(steps, guidance),
            "dtype": ("bf16" if bf16 else "fp32") + (", decoder matmuls int8" if int8 else ""),
            "seed": seed,
            "batch_size": batch_size,
            "processes": dist_info.world_size,
            "device": str(device),
            "checkpoint_sha256": file_sha256(resolve_model_dir(model_path) / WEIGHTS_NAME) if model_path else None,
            "psnr_ssim": f"torchmetrics on [0, 1], data_range=1, per image, then the mean over images; PSNR in dB; "
                         f"{SSIM_CONVENTION}",
            "timing": "decode only (no encode), seconds per image, mean over the batches after each process's first "
                      "(which builds kernels and warms caches; timed alone only when it is the only one); img_per_s "
                      "is its inverse, per process",
            # how the metrics that ran were computed (a skipped one's reason is in skipped_metrics)
            **({"lpips": "LPIPS, VGG16 backbone, v0.1 linear heads" + (", under bf16 autocast" if bf16 else "")}
               if lpips is not None else {}),
            **({"rfid": "torchmetrics FrechetInceptionDistance, torch-fidelity Inception-v3 2048-d features, "
                        "reconstructions vs the same cropped originals"} if fid is not None else {}),
        },
    }


def finite_or_null(value):
    """`value` (JSON-like) with every infinite or NaN float replaced by None: strict JSON has no Infinity or NaN."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
