"""bf16 inference with weights stored in bf16.

Under `torch.autocast(bfloat16)` a linear or convolution layer with float32 weights casts its weight
on every call: 16-17% of a paper-256 student decode on the CPU (benchmarks/README.md, profile).
`cast_weights` stores those weights in bf16 once (norms, embeddings and buffers stay float32; so do the
linear path's maps `to_linear` and `from_linear`, which run in float32 outside autocast). The result of a call
under autocast is the same: autocast rounds a float32 weight to the same bf16 values.
`Bf16Copies` keeps such a copy per module for `Tokenizer.encode/decode(bf16=True)`, rebuilt when the
float32 weights change (an optimiser step, `load_state_dict`, `.to()`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


FP32_LAYERS = ("to_linear", "from_linear")  # the linear path's maps (msdd.models.linear.fp32_region)


def cast_weights(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Store the weights of the linear and convolution layers of `module` in `dtype`, in place (None: leave
    it as it is)."""
    if dtype is not None:
        fp32 = [getattr(module, name, None) for name in FP32_LAYERS]
        for m in module.modules():
            if all(m is not f for f in fp32) and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                m.to(dtype)
    return module


def weights_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `module` is replaced or modified in place."""
    return tuple((t.data_ptr(), t._version, t.device) for t in (*module.parameters(), *module.buffers()))


class Bf16Copies:
    """A bf16-weight copy (`cast_weights`) of each module asked for, kept until the module's weights
    change. Holds the copies outside the module tree: they are not parameters of their owner and
    do not appear in its state_dict. Costs half the module's float32 size per copy."""

    def __init__(self) -> None:
        self.copies: dict[int, tuple[tuple, nn.Module]] = {}

    def of(self, module: nn.Module) -> nn.Module:
        if any(p.is_inference() for p in module.parameters()):  # no version counters to key on
            return module
        key = weights_key(module)
        kept = self.copies.get(id(module))
        if kept is None or kept[0] != key:
            self.copies[id(module)] = (key, cast_weights(copy.deepcopy(module), torch.bfloat16))
        return self.copies[id(module)][1]

    def clear(self) -> None:
        self.copies.clear()
