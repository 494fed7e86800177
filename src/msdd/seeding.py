"""Per-image noise: a generator per image, seeded from a run seed and a key of that image alone, so an
image's decode noise does not depend on its batch or its neighbours. The msdd family's decode is then the same bit
for bit alone or in any batch; an SSDD decode differs by float rounding (ssdd-tiny-test, random weights: up to 3e-7
in float32, 1e-3 in bf16)."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def image_generators(seed: int, keys: Sequence[int | str]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from `seed` and the image's own key (the decode noise of one
    image then never depends on its batch or its neighbours; `Tokenizer.decode` takes the list).

    An int key (an index) is seeded as `msdd eval` seeds image i: `seed * 1_000_003 + i`. A str key (the
    file's own name that `msdd reconstruct` uses, before collisions are renamed) is seeded with the first 63 bits of
    sha256(f"{seed}:{key}"): stable across runs, processes and machines (unlike Python's `hash`)."""
    out = []
    for key in keys:
        if isinstance(key, str):
            # surrogateescape: a file name that is not UTF-8 (os.listdir's surrogates) hashes as its own bytes
            text = f"{seed}:{key}".encode("utf-8", "surrogateescape")
            value = int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1
        else:
            value = derived_seed(seed, int(key))
        out.append(torch.Generator().manual_seed(value))
    return out


def derived_seed(seed: int, n: int) -> int:
    """The seed of item `n` (an image index, an epoch) under run seed `seed`: seed * 1,000,003 + n, taken modulo 2**64
    as torch's generators take it, so that a large run seed works (torch refuses values from 2**64 on; the values
    below that seed the same generator with or without the modulo)."""
    return (seed * 1_000_003 + n) % 2**64


__all__ = ["derived_seed", "image_generators"]
