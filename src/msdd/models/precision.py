"""Reduced-precision inference: bf16 weights, int8 matmuls.

Under `torch.autocast(bfloat16)` a linear or convolution layer with float32 weights casts its weight
on every call: 16-17% of a paper-256 student decode on the CPU (benchmarks/README.md, profile).
`cast_weights` stores those weights in bf16 once (norms, embeddings and buffers stay float32; so do the
linear path's maps `to_linear` and `from_linear`, which run in float32 outside autocast). The result of a call
under autocast is the same: autocast rounds a float32 weight to the same bf16 values.
`quantise_int8` replaces the matmuls of the transformer streams (queries/keys/values, output projection,
SwiGLU MLP) by dynamically quantised int8 linear layers (PyTorch's `torch.ao` dynamic quantisation: weights
int8 per output channel, activations quantised per call, int32 accumulation; fbgemm / x86 VNNI kernels, CPU
only); the rest stays float32. On the shipped tiny-64 student it costs 0.03 dB of PSNR; a paper-256 student
decode runs 1.76x faster than in float32 on the 2-core EPYC (benchmarks/README.md, `student-int8`).
`WeightCopies` keeps such a copy per module and kind for `Tokenizer.encode/decode(bf16=True)` and
`decode(int8=True)`, rebuilt when the float32 weights change (an optimiser step, `load_state_dict`, `.to()`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


FP32_LAYERS = ("to_linear", "from_linear")  # the linear path's maps (msdd.models.linear.fp32_region)
INT8_LAYERS = ("qkv", "proj", "w12", "w3")  # the matmuls of a transformer stream (msdd.models.layers.Stream)


def cast_weights(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Store the weights of the linear and convolution layers of `module` in `dtype`, in place (None: leave
    it as it is)."""
    if dtype is not None:
        fp32 = [getattr(module, name, None) for name in FP32_LAYERS]
        for m in module.modules():
            if all(m is not f for f in fp32) and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                m.to(dtype)
    return module


def weights_key(module: nn.Module, versions: bool = True) -> tuple:
    """Changes whenever a parameter or buffer of `module` is replaced or (with `versions`: inference tensors
    have no version counter) modified in place."""
    return tuple((t.data_ptr(), t._version if versions else 0, t.device)
                 for t in (*module.parameters(), *module.buffers()))


def int8_engine() -> str | None:
    """The engine of the int8 linear layers on this machine (x86 / fbgemm: per-channel weights, VNNI where the
    CPU has it), None if there is none."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in engines), None)


def quantise_int8(module: nn.Module) -> nn.Module:
    """Replace, in place, every linear layer named in `INT8_LAYERS` by a dynamically quantised int8 one (module
    docstring); CPU only."""
    engine = int8_engine()
    if engine is None:
        raise ValueError("int8 decoding needs PyTorch's x86 quantised kernels (fbgemm), which this PyTorch build "
                         "or CPU lacks; decode in float32 or with bf16=True")
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.backends.quantized.engine = engine
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in INT8_LAYERS and isinstance(child, nn.Linear):
                if child.weight.device.type != "cpu":
                    raise ValueError(f"int8 decoding runs on the CPU only; the module is on {child.weight.device}")
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.load_state_dict({k: v.float() for k, v in child.state_dict().items()})
                plain.qconfig = per_channel_dynamic_qconfig
                with warnings.catch_warnings():  # torch.ao's notice that eager quantisation is moving to torchao
                    warnings.simplefilter("ignore")
                    setattr(parent, name, Int8Linear.from_float(plain))
    return module


def encode_kwargs(decode_kwargs: dict) -> dict:
    """The precision options of a `decode` call that its `encode` takes too (bf16, int8)."""
    return {k: decode_kwargs[k] for k in ("bf16", "int8") if k in decode_kwargs}


class WeightCopies:
    """A reduced-precision copy of each module asked for, per kind: "bf16" (`cast_weights`) or "int8"
    (`quantise_int8`), kept until the module's weights change. Holds the copies outside the module tree:
    they are not parameters of their owner and do not appear in its state_dict. A bf16 copy costs half the
    module's float32 size, and as much again once its linear layers have packed their weights for their CPU kernels
    (`msdd.models.layers.Linear`: msdd's or oneDNN's); an int8 one about a quarter of
    its stream weights plus its other weights."""

    MAKERS = {"bf16": lambda m: cast_weights(m, torch.bfloat16), "int8": quantise_int8}

    def __init__(self) -> None:
        self.copies: dict[tuple[int, str], tuple[tuple, nn.Module]] = {}

    def of(self, module: nn.Module, kind: str = "bf16") -> nn.Module:
        inference = any(p.is_inference() for p in module.parameters())  # no version counters
        if inference and kind == "bf16":  # autocast casts the weights instead
            return module
        key = weights_key(module, versions=not inference)
        kept = self.copies.get((id(module), kind))
        if kept is None or kept[0] != key:
            self.copies[(id(module), kind)] = (key, self.MAKERS[kind](copy.deepcopy(module)))
        return self.copies[(id(module), kind)][1]

    def clear(self) -> None:
        self.copies.clear()
