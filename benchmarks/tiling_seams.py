"""Seam error of tiled reconstruction (issue 17): PSNR of the overlap bands against the tile interiors.

    python benchmarks/tiling_seams.py --photo astronaut --overlaps 0 8 16 \
        --out benchmarks/results/tiling/seams.json

An embedded photograph at full size (scikit-image's 512 x 512 astronaut by default) is reconstructed by
the bundled student (`Tokenizer.reconstruct`, tiles at the model's 64 px) with each overlap. The band is
every pixel two tiles share (`msdd.tiles.seam_mask`); with overlap 0 it is the two-pixel line around each
tile border instead, where a seam would show. A band much worse than the interior is a visible seam.
"""

import argparse
import json
import sys
import time

import torch

from msdd import Tokenizer
from msdd.data import load_photo
from msdd.data.images import to_tensor
from msdd.eval.metrics import quantize
from msdd.tiles import seam_mask, tile_starts


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean().item()  # on the [0, 1] scale
    return 10 * torch.log10(torch.tensor(1 / mse)).item()


def border_mask(h: int, w: int, tile: int) -> torch.Tensor:
    """Two pixels either side of every inner tile border, for overlap 0."""
    m = torch.zeros(h, w, dtype=torch.bool)
    for y in tile_starts(h, tile, 0)[1:]:
        m[max(0, y - 2):y + 2] = True
    for x in tile_starts(w, tile, 0)[1:]:
        m[:, max(0, x - 2):x + 2] = True
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photo", default="astronaut")
    ap.add_argument("--model", default=None)
    ap.add_argument("--overlaps", type=int, nargs="+", default=[0, 8, 16])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok = Tokenizer.from_pretrained(a.model)
    x = to_tensor(load_photo(a.photo))
    h, w = x.shape[1:]
    r = tok.config.image_size
    rows = []
    for overlap in a.overlaps:
        t0 = time.perf_counter()
        y = quantize(tok.reconstruct(x[None], tile_overlap=overlap)[0])
        seconds = time.perf_counter() - t0
        band = seam_mask(h, w, r, overlap) if overlap > 0 else border_mask(h, w, r)
        row = {"overlap": overlap, "tiles": len(tile_starts(h, r, overlap)) * len(tile_starts(w, r, overlap)),
               "seconds": round(seconds, 2), "psnr": round(psnr(y, x), 3),
               "band_psnr": round(psnr(y[:, band], x[:, band]), 3),
               "interior_psnr": round(psnr(y[:, ~band], x[:, ~band]), 3),
               "band_share": round(band.float().mean().item(), 3)}
        row["band_minus_interior_db"] = round(row["band_psnr"] - row["interior_psnr"], 3)
        rows.append(row)
        print(row, flush=True)
    result = {"command": "python " + " ".join(sys.argv), "photo": a.photo, "size": [h, w],
              "model": tok.metadata.get("name", a.model or "bundled student") if hasattr(tok, "metadata") else a.model,
              "model_resolution": r, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
