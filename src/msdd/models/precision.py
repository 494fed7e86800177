"""Reduced-precision inference: bf16 weights, int8 matmuls.

Under `torch.autocast(bfloat16)` a linear or convolution layer with float32 weights casts its weight
on every call, a large share of a paper-256 student decode on the CPU (benchmarks/README.md, "The first
profile, before msdd's kernels").
`cast_weights` stores those weights in bf16 once (norms, embeddings and buffers stay float32; so do the
linear path's maps `to_linear` and `from_linear`, which run in float32 outside autocast). The result of a call
under autocast is the same: autocast rounds a float32 weight to the same bf16 values.
`quantise_int8` replaces the matmuls of the transformer streams (queries/keys/values, output projection,
SwiGLU MLP) by int8 linear layers: weights int8 per output channel, activations quantised per call, int32 sums.
Where msdd's CPU kernels run (AVX512-BF16 and VNNI), `Int8Linear`: activations per token (row), symmetric, the
VNNI kernel `cpu_kernels.linear_int8` (faster than msdd's bf16 kernel at the decoder's shapes: benchmarks/README.md,
"int8 on msdd's own VNNI kernel, with bf16 around it"), bf16 or float32 around it (`decode(int8=True, bf16=True)` /
`int8=True`); elsewhere PyTorch's `torch.ao` dynamic quantisation (per-tensor activations, fbgemm: one scale for the
whole batch, so that an image's result depends on the others in its batch), float32 around it. On the shipped
tiny-64 student either stays within the issue's bar of 0.1 dB of PSNR (benchmarks/README.md, "int8 matmuls:
`decode(int8=True)` and the `student-int8` row").
`WeightCopies` keeps such a copy per module and kind for `Tokenizer.encode/decode(bf16=True)` and
`decode(int8=True)`, rebuilt when the float32 weights change (an optimiser step, `load_state_dict`, `.to()`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from msdd.models import cpu_kernels
from msdd.models.layers import _fast_cpu_inference


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


class Int8Linear(nn.Module):
    """A linear layer in int8 (module docstring): `weight` int8 (N, K) with `scale` (N,) (the float weight is about
    weight * scale[:, None]), `bias` float32 or None. Inputs (..., K) are quantised per row: q = round(x * 127 /
    max |x_r|). The CPU kernel computes the exact int32 sums q . weight, times scale_c max |x_r| / 127, plus the bias,
    in float32 rounded once to x's dtype (bf16 or float32), and with `panel_forward(x, swiglu=True)` a SwiGLU MLP's
    gate from its first layer's outputs; `reference` is the same arithmetic in PyTorch ops (gradients, other devices
    and dtypes, shapes the kernel does not take: N a multiple of 64, K of 4)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        w = layer.weight.detach().float()
        scale = w.abs().amax(1) / 127
        self.register_buffer("weight", torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._panels: dict[bool, tuple | None] = {}  # swiglu -> the kernel's packed weight, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.panel_forward(x)
        return self.reference(x) if out is None else out

    def panel_forward(self, x: torch.Tensor, swiglu: bool = False, residual: torch.Tensor | None = None,
                      gate: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layer (`swiglu`: the gate silu(a) * b of its output [a | b]; `residual` and `gate`: residual + gate * its
        output) by the kernel; None where it does not apply (also outside the optimised CPU path,
        `msdd.models.layers.unoptimised`)."""
        if not (_fast_cpu_inference(x) and x.dtype in cpu_kernels.DTYPES) or (
                residual is not None and residual.dtype != x.dtype):
            return None
        packed = self.panels(swiglu)
        return None if packed is None else cpu_kernels.linear_int8(x, *packed, swiglu, residual, gate)

    def panels(self, swiglu: bool = False) -> tuple | None:
        """The layer as `cpu_kernels.pack_linear_int8` packs it (`swiglu`: as a SwiGLU MLP's first layer), once;
        None where the kernel does not apply."""
        if swiglu not in self._panels:
            self._panels[swiglu] = cpu_kernels.pack_linear_int8(self.weight, self.scale, self.bias, swiglu)
        return self._panels[swiglu]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        amax = xf.abs().amax(-1, keepdim=True)
        q = torch.round(xf * torch.where(amax > 0, 127 / amax, 0))
        out = (q @ self.weight.float().T) * (self.scale * (amax / 127))
        return (out if self.bias is None else out + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"

    def _apply(self, fn, *args, **kwargs):  # .to(): the packed copies follow the buffers again
        self._panels = {}
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {k: v if k != "_panels" else {} for k, v in super().__getstate__().items()}


def msdd_int8() -> bool:
    """quantise_int8 makes msdd's `Int8Linear` layers (its CPU kernels run here), not torch.ao's."""
    return cpu_kernels.library() is not None


def quantise_int8(module: nn.Module) -> nn.Module:
    """Replace, in place, every linear layer named in `INT8_LAYERS` by an int8 one (module docstring); CPU only."""
    msdd = msdd_int8()
    engine = int8_engine()
    if not msdd and engine is None:
        raise ValueError("int8 decoding needs msdd's CPU kernels (AVX512-BF16 and VNNI, a C++ compiler) or "
                         "PyTorch's x86 quantised kernels (fbgemm), and neither runs here; decode in float32 or "
                         "with bf16=True")
    from torch.ao.nn.quantized.dynamic import Linear as AoInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if not msdd:
        torch.backends.quantized.engine = engine
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in INT8_LAYERS and isinstance(child, nn.Linear):
                if child.weight.device.type != "cpu":
                    raise ValueError(f"int8 decoding runs on the CPU only; the module is on {child.weight.device}")
                if msdd:
                    setattr(parent, name, Int8Linear(child))
                    continue
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.load_state_dict({k: v.float() for k, v in child.state_dict().items()})
                plain.qconfig = per_channel_dynamic_qconfig
                with warnings.catch_warnings():  # torch.ao's notice that eager quantisation is moving to torchao
                    warnings.simplefilter("ignore")
                    setattr(parent, name, AoInt8Linear.from_float(plain))
    return module


def encode_kwargs(decode_kwargs: dict) -> dict:
    """The precision options of a `decode` call that its `encode` takes too (bf16, int8)."""
    return {k: decode_kwargs[k] for k in ("bf16", "int8") if k in decode_kwargs}


class WeightCopies:
    """A reduced-precision copy of each module asked for, per kind: "bf16" (`cast_weights`), "int8"
    (`quantise_int8`) or "int8-bf16" (both: int8 streams, the other weights bf16), kept until the module's weights
    change. Holds the copies outside the module tree: they are not parameters of their owner and do not appear in its
    state_dict. A bf16 copy costs half the module's float32 size, and as much again once its linear layers have packed
    their weights for their CPU kernels (`msdd.models.layers.Linear`: msdd's or oneDNN's); an int8 one about a quarter
    of its stream weights (half with msdd's packed copy) plus its other weights."""

    MAKERS = {"bf16": lambda m: cast_weights(m, torch.bfloat16), "int8": quantise_int8,
              "int8-bf16": lambda m: cast_weights(quantise_int8(m), torch.bfloat16)}

    def __init__(self) -> None:
        self.copies: dict[tuple[int, str], tuple[tuple, nn.Module]] = {}

    def of(self, module: nn.Module, kind: str = "bf16") -> nn.Module:
        inference = any(p.is_inference() for p in module.parameters())  # no version counters
        if inference and kind == "bf16":  # autocast casts the weights instead
            return module
        key = weights_key(module, versions=not inference)
        kept = self.copies.get((id(module), kind))
        if kept is None or kept[0] != key:
            # made as ordinary tensors even inside inference_mode: inference tensors have no version counter, so the
            # decoder's modulation cache (keyed by versions) would never apply to the copy, and a bf16 decode inside
            # inference_mode would run slower than under no_grad
            with torch.inference_mode(False):
                self.copies[(id(module), kind)] = (key, self.MAKERS[kind](copy.deepcopy(module)))
        return self.copies[(id(module), kind)][1]

    def forget(self, module: nn.Module) -> None:
        """Drop the copies of `module`."""
        self.copies = {k: v for k, v in self.copies.items() if k[0] != id(module)}

    def clear(self) -> None:
        self.copies.clear()
