"""FLOP counts with `torch.utils.flop_counter`, attention included.

FlopCounterMode has no formula for the CPU flash-attention kernel behind SDPA
(`aten._scaled_dot_product_flash_attention_for_cpu`) and would silently count 0 for it (about 17% of a
paper-size decoder pass at 1024 tokens); we pass the standard SDPA formula for it as a custom mapping.
Models can be built on the `meta` device so that counting costs no compute.
Counts are the network's, on the reference path (`msdd.models.layers.unoptimised`): every adaLN product
per sample and pass, which the decoder's modulation cache skips in a real decode after the first call at a
time (0.2% of a paper-256 decode), and a linear-path decoder's linear image at every pass, which a decode
computes once per stage (`Decoder.same_latents`: 2.0% of the shipped tiny-64 student's decode, 2.6% of its
teacher's; paper-256 has no linear path).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from msdd.models.layers import unoptimised


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable, *args, **kwargs) -> int:
    with torch.inference_mode(), unoptimised(), flop_counter() as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def decoder_pass_flops(tok, batch: int = 1) -> list[int]:
    """FLOPs of one decoder forward pass at each stage (list over stages), for `batch` images (the ssdd
    and plain families have one stage, at full resolution)."""
    return tok.family.pass_flops(tok.decoder, batch)


def decode_flops(tok, steps, guidance: float, batch: int = 1) -> int:
    """FLOPs of a full decode with `steps` per stage and guidance scale `guidance` (the family's passes per step)."""
    return tok.family.decode_flops(tok.decoder, steps, guidance, batch)


def encoder_flops(tok, batch: int = 1) -> int:
    c = tok.config
    device = next(tok.parameters()).device
    return count_flops(tok.encoder, torch.zeros(batch, 3, c.image_size, c.image_size, device=device))
