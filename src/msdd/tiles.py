"""Images of any size through a tokenizer of one resolution R: overlapping R x R tiles, each encoded and
decoded on its own, blended back with linear ramps over the overlaps (issue 17).

Tiles start at evenly spread offsets whose last tile ends at the image's edge, so every overlap is at
least `overlap` pixels and no size needs padding unless a side is shorter than R (then the image is
padded by reflection, or by repeating the edge where it is too small to reflect, and cropped back).
Inside an overlap the two tiles' weights fall and rise linearly and sum to one; the image's own border
gets full weight. Every tile draws its decode noise from its own generator (`key` and tile index), so a
tiled reconstruction does not depend on how many tiles are decoded together.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from msdd.models.precision import encode_kwargs
from msdd.seeding import image_generators


def check_overlap(overlap, tile: int, name: str = "tile_overlap") -> int:
    """`overlap` if it is a whole number of pixels in [0, tile / 2], else a ValueError naming `name` (more: up to a
    tile per pixel, 63 of 64 px meant 33,000 tiles for 320 x 192)."""
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Integral) or not 0 <= overlap <= tile // 2:
        raise ValueError(f"{name} must be a whole number of pixels in [0, {tile // 2}] (at most half a tile) for a "
                         f"{tile} px model, got {overlap!r}")
    return int(overlap)  # numpy's integers too


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of size `tile` covering [0, length) (length >= tile) with overlaps >= `overlap`."""
    check_overlap(overlap, tile)
    if length <= tile:
        return [0]
    n = -(-(length - tile) // (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp_weights(starts: list[int], tile: int) -> list[torch.Tensor]:
    """Per tile, a 1-D weight (tile,): 1 inside, a linear ramp over each overlap with a neighbour."""
    out = []
    for i, s in enumerate(starts):
        w = torch.ones(tile)
        if i > 0:  # rises over the overlap with the previous tile
            o = starts[i - 1] + tile - s
            w[:o] = torch.arange(1, o + 1) / (o + 1)
        if i + 1 < len(starts):  # falls over the overlap with the next one
            o = s + tile - starts[i + 1]
            w[tile - o:] = torch.minimum(w[tile - o:], torch.arange(o, 0, -1) / (o + 1))
        out.append(w)
    return out


def _pad_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) padded at the bottom/right to at least `size` on both sides."""
    ph, pw = max(0, size - image.shape[1]), max(0, size - image.shape[2])
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if ph < image.shape[1] and pw < image.shape[2] else "replicate"
    return F.pad(image[None], (0, pw, 0, ph), mode=mode)[0]


@torch.no_grad()
def reconstruct_tiled(tok, image: torch.Tensor, overlap: int | None = None, key: str | int = 0,
                      seed: int = 0, batch_size: int = 32, **decode_kwargs) -> torch.Tensor:
    """One image (3, H, W) in [-1, 1], any H and W, reconstructed at its own size by `tok` in tiles.

    overlap: pixels shared by neighbouring tiles (default R // 4); decode_kwargs: `Tokenizer.decode`'s
    (steps, guidance, bf16, int8; the last two apply to the encoder too)."""
    r = tok.config.image_size
    overlap = r // 4 if overlap is None else overlap
    h, w = image.shape[1:]
    padded = _pad_to(image.float(), r)
    ys, xs = tile_starts(padded.shape[1], r, overlap), tile_starts(padded.shape[2], r, overlap)
    wy, wx = ramp_weights(ys, r), ramp_weights(xs, r)
    places = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    gens = image_generators(seed, [f"{key}#tile{k}" for k in range(len(places))])
    out = torch.zeros_like(padded)
    total = torch.zeros(padded.shape[1:])
    precision = encode_kwargs(decode_kwargs)
    for b in range(0, len(places), batch_size):
        chunk = places[b:b + batch_size]
        tiles = torch.stack([padded[:, ys[i]:ys[i] + r, xs[j]:xs[j] + r] for i, j in chunk])
        z = tok.encode(tiles.to(tok.device), **precision)
        x = tok.decode(z, generator=gens[b:b + batch_size], **decode_kwargs).float().cpu()
        for (i, j), t in zip(chunk, x):
            wt = wy[i][:, None] * wx[j][None, :]
            out[:, ys[i]:ys[i] + r, xs[j]:xs[j] + r] += t * wt
            total[ys[i]:ys[i] + r, xs[j]:xs[j] + r] += wt
    return (out / total)[:, :h, :w].clamp(-1, 1)


def seam_mask(height: int, width: int, tile: int, overlap: int) -> torch.Tensor:
    """(H, W) bool: True on the pixels two or more tiles share (the overlap bands), for a seam report."""
    count = torch.zeros(max(height, tile), max(width, tile))
    ys, xs = tile_starts(count.shape[0], tile, overlap), tile_starts(count.shape[1], tile, overlap)
    for y in ys:
        for x in xs:
            count[y:y + tile, x:x + tile] += 1
    return (count > 1)[:height, :width]
