"""Building blocks shared by the encoder and the decoders: attention (RoPE from msdd.models.rope), MMDiT joint block,
SwiGLU, adaLN.

An MMDiT block keeps two token streams with separate weights (image tokens and context/register
tokens); their queries, keys and values are concatenated and go through ONE attention, so every token
attends to both streams. In the decoder each stream is modulated (adaLN: shift, scale, gate) by the
timestep embedding; the encoder uses the same block without modulation.
`attention` (RoPE + scaled dot-product attention) is the one attention of every transformer block here
and in the SSDD bottleneck.

Inference speed-ups (here: CPU linear layers with SwiGLU's gate and the blocks' gated residuals in their epilogue,
attention with its q / k norms straight from the qkv projections, adaLN (with the gated residual before it where the
linear kernel cannot take it) on msdd.models.cpu_kernels or oneDNN; cached modulation in msdd.models.decoder) compute
what the reference path does to its precision, not its rounding (float32 within 1e-5, bf16 images within 0.05), but
call no LayerNorm as a module (hooks on one run only under `unoptimised()`, which switches the speed-ups off).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from msdd.models import cpu_kernels
from msdd.models.keys import address_key, version_key
from msdd.models.rope import apply_rope

# ---------------------------------------------------------------------------------------------
# the switch between the optimised and the reference path

_OPTIMISED = True


@contextlib.contextmanager
def unoptimised():
    """Inside this context every network runs its reference path: BLAS linear layers, unfused elementwise
    ops, modulation computed on every call. fp32 results agree with the optimised path to rounding (about
    1e-7 on the tiny models, 3e-6 at paper-256)."""
    global _OPTIMISED
    before, _OPTIMISED = _OPTIMISED, False
    try:
        yield
    finally:
        _OPTIMISED = before


def optimised() -> bool:
    return _OPTIMISED


ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_onednn_linear = torch.ops.mkldnn._linear_pointwise.default if ONEDNN_LINEAR else None


def _fast_cpu_inference(x: torch.Tensor) -> bool:
    """The optimised path applies: CPU inference outside tracing and compilation."""
    return (_OPTIMISED and x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def _bf16_compute(x: torch.Tensor) -> bool:
    """A CPU op on x computes in bf16: x is bf16 or bf16 autocast is on."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


class Linear(nn.Linear):
    """nn.Linear whose CPU inference runs faster kernels on a copy of its weight packed once per weight version (as
    much memory as the weight): on token sequences (3-D inputs) msdd's linear kernel (`cpu_kernels.linear`: bf16 or
    float32, output features a multiple of 64; with a SwiGLU MLP's gate: `panel_forward(x, swiglu=True)`); elsewhere
    oneDNN's (`torch.ops.mkldnn._linear_pointwise`, faster than `F.linear`'s BLAS; benchmarks/README.md, "The
    optimised decode against the reference path") on the weight in oneDNN's blocked layout: bf16 weights always,
    float32 ones for inputs of more than one row (vectors, such as the modulation's, keep the weight as it is).
    Everything else (gradients, float32 weights under autocast, CUDA, tracing for ONNX or compile, the reference path)
    is nn.Linear's forward."""

    _packed: tuple[tuple, torch.Tensor] | None = None  # (the weight's version_key, oneDNN's packed weight)
    _panels: tuple[tuple, tuple | None, tuple] | None = None  # (key, msdd's packed weight and bias, storages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_cpu_inference(x):  # a call's Python is a visible share of a batch-1 pass: no needless ops
            if x.dim() >= 3 and (out := self.panel_forward(x)) is not None:
                return out
            if ONEDNN_LINEAR:
                w, bias = self.weight, self.bias
                if x.dtype == torch.float32 and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
                    packed = FP32_PACKING and x.numel() > x.shape[-1]  # a matrix, not a vector
                    return _onednn_linear(x, self.packed_weight() if packed else w, bias, "none", [], "")
                if w.dtype == torch.bfloat16 and BF16_PACKING and _bf16_compute(x):
                    if bias is not None and bias.dtype != torch.bfloat16:
                        bias = bias.to(torch.bfloat16)
                    return _onednn_linear(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16),
                                          self.packed_weight(), bias, "none", [], "")
        return super().forward(x)

    def panel_forward(self, x: torch.Tensor, swiglu: bool = False, residual: torch.Tensor | None = None,
                      gate: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layer (`swiglu`: the gate silu(a) * b of its output [a | b]; `residual` and `gate`: residual + gate *
        its output, `gated_linear`) by msdd's linear kernel in the dtype `forward` computes in; None where that does not
        apply. On the optimised CPU path only (the caller checks)."""
        w = self.weight
        if w.dtype == torch.bfloat16:
            if not _bf16_compute(x):
                return None
            x = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        elif w.dtype != torch.float32 or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return None
        if residual is not None and residual.dtype != x.dtype:
            return None
        if (panels := self.panels(swiglu)) is None:  # the kernel does not apply: not built, or the shape does not fit
            return None
        return cpu_kernels.linear(x, *panels, swiglu, residual, gate)

    def panels(self, swiglu: bool = False, dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight and bias as `cpu_kernels.pack_linear` packs them (`swiglu`: as a SwiGLU MLP's first layer),
        repacked when either is replaced or changed in place; None where the kernel does not apply or the weight is
        not of `dtype` (where given)."""
        w, b = self.weight, self.bias
        if dtype is not None and w.dtype != dtype:
            return None
        key = (swiglu, address_key(w), address_key(b))  # checked on every call: cheaper than version_key
        if self._panels is None or self._panels[0] != key:
            packed = cpu_kernels.pack_linear(w.detach(), None if b is None else b.detach(), swiglu)
            self._panels = (key, packed, (w.untyped_storage(), None if b is None else b.untyped_storage()))
        return self._panels[1]

    def packed_weight(self) -> torch.Tensor:
        """The weight (bf16 or float32) in oneDNN's layout, repacked when the weight is replaced or changed in place."""
        key = version_key(self.weight)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) drop the packed weights: oneDNN's can't be copied
        state = dict(super().__getstate__())  # a copy: object's own is the live __dict__
        return {k: v for k, v in state.items() if k not in ("_packed", "_panels")}


def _packing_works(dtype: torch.dtype) -> bool:
    if not ONEDNN_LINEAR or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:  # oneDNN refuses bf16 on CPUs without AVX-512 (or AMX / AVX2-VNNI-NE)
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, None, "none", [], "")
        return True
    except RuntimeError:
        return False


BF16_PACKING = _packing_works(torch.bfloat16)
FP32_PACKING = _packing_works(torch.float32)


# ---------------------------------------------------------------------------------------------
# attention


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """RoPE on queries and keys, then scaled dot-product attention: q, k, v (B, heads, N, D) -> (B, N, heads * D)."""
    v = v.to(q.dtype)
    if _fast_cpu_inference(q) and (out := cpu_kernels.attention(q, k, v, rope)) is not None:
        return out  # the fused CPU kernel, RoPE included: already (B, N, heads * D)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if _fp32_cpu_attention(q, k):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")


# Up to this many keys PyTorch's CPU flash attention computes forward and backward faster in float32 than in bf16
# (head sizes 32 and 64; at 1152 keys no longer: benchmarks/README.md, "Training step")
FP32_CPU_ATTENTION_MAX_KEYS = 768


def _fp32_cpu_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """A bf16 attention of a CPU training step (gradients on, not traced for export; compiled or not) that float32
    computes faster; its output is rounded to bf16 as the bf16 attention's."""
    return (q.device.type == "cpu" and torch.is_grad_enabled() and k.shape[-2] <= FP32_CPU_ATTENTION_MAX_KEYS
            and _bf16_compute(q) and not torch.jit.is_tracing())


# ---------------------------------------------------------------------------------------------
# small modules


class Tracked:
    """Counts in `Tracked.structure` every attribute or submodule set on a JointBlock, Stream or SwiGLU (a layer
    replaced, int8 layers swapped in): `msdd.models.fused_blocks` keeps what it checked of the blocks until it moves."""

    structure = 0

    def __setattr__(self, name, value) -> None:
        Tracked.structure += 1
        super().__setattr__(name, value)


class SwiGLU(Tracked, nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w12 = Linear(width, 2 * hidden)
        self.w3 = Linear(hidden, width)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(a) * b for [a | b] = w12(x)."""
        if (_fast_cpu_inference(x) and x.dim() >= 3 and hasattr(self.w12, "panel_forward")  # not torch.ao's int8 layer
                and (gated := self.w12.panel_forward(x, swiglu=True)) is not None):
            return gated  # the gate computed with the first layer's products
        h = self.w12(x)
        if _fast_cpu_inference(h) and (gated := cpu_kernels.swiglu(h)) is not None:
            return gated  # silu(a) * b in one pass
        a, b = h.chunk(2, dim=-1)
        return F.silu(a) * b

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """w3(silu(a) * b); with `residual` and `gate` (an MMDiT stream's gated residual), residual + gate * that."""
        hidden = self.hidden(x)
        if residual is None:
            return self.w3(hidden)
        out = gated_linear(self.w3, hidden, residual, gate)
        return gated_add(residual, gate, self.w3(hidden)) if out is None else out


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, W) * (1 + scale) + shift, with shift and scale (B, W) or (1, W) (shared by the batch)."""
    if _OPTIMISED:  # one pass over x instead of two
        return torch.addcmul(shift[:, None], x, (1 + scale)[:, None])
    return x * (1 + scale[:, None]) + shift[:, None]


def adaln(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(LayerNorm(x), shift, scale) with `norm`'s eps and without its affine weights, if it has any (a stream
    passes them as shift and scale, `Stream.affine_mods`): one pass of the fused kernel on the optimised CPU path."""
    if _fast_cpu_inference(x) and (out := cpu_kernels.adaln(x, shift, scale, norm.eps)) is not None:
        return out
    return modulate(F.layer_norm(x, norm.normalized_shape, eps=norm.eps), shift, scale)


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate * y, x and y (B, N, W), gate (B, W) or (1, W)."""
    if _OPTIMISED:
        return torch.addcmul(x, gate[:, None], y)
    return x + gate[:, None] * y


def gated_linear(layer: nn.Module, y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor | None:
    """gated_add(x, gate, layer(y)) in the epilogue of msdd's linear kernel, without a pass over x and the layer's
    output after the layer; None where that does not apply (off the optimised CPU path, a gate per batch element, a
    layer the kernel does not take)."""
    if _fast_cpu_inference(y) and y.dim() >= 3 and gate.shape[0] == 1 and hasattr(layer, "panel_forward"):
        return layer.panel_forward(y, residual=x, gate=gate)
    return None


def gated_adaln(norm: nn.LayerNorm, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x' = gated_add(x, gate, y) and adaln(norm, x', shift, scale): one pass of the fused kernel on the optimised CPU
    path."""
    if _fast_cpu_inference(x) and (fused := cpu_kernels.gated_adaln(x, gate, y, shift, scale, norm.eps)) is not None:
        return fused
    x = gated_add(x, gate, y)
    return x, adaln(norm, x, shift, scale)


# ---------------------------------------------------------------------------------------------
# MMDiT


class Stream(Tracked, nn.Module):
    """One stream of a joint block: its own norms, qkv, output projection and MLP.

    `modulated`: adaLN from the conditioning vector (decoder) instead of affine LayerNorm (encoder).
    `pre_only`: the stream's output is not needed after this block (last block), so it only
    contributes keys and values and has no projection / MLP.
    """

    def __init__(self, width: int, heads: int, mlp_hidden: int, modulated: bool, pre_only: bool) -> None:
        super().__init__()
        self.heads, self.modulated, self.pre_only = heads, modulated, pre_only
        head_dim = width // heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not modulated, eps=1e-6)
        self.qkv = Linear(width, 3 * width)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        if not pre_only:
            self.proj = Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=not modulated, eps=1e-6)
            self.mlp = SwiGLU(width, mlp_hidden)
        if modulated:
            n_mod = 2 if pre_only else 6
            self.adaln = Linear(width, n_mod * width)
            nn.init.zeros_(self.adaln.weight)  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(self.adaln.bias)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The adaLN vectors (shift, scale[, gate, shift, scale, gate]) for conditioning c (B, W), each (B, W)."""
        return self.adaln(F.silu(c)).chunk(2 if self.pre_only else 6, dim=-1)

    def pre_qkv(self, x: torch.Tensor, c: torch.Tensor | None, mods: tuple[torch.Tensor, ...] | None = None):
        """(B, N, W) -> the qkv projection (B, N, 3 W), plus the modulation vectors (`mods` when given, else
        computed from c, or `affine_mods`)."""
        if mods is None:
            mods = self.modulation(c) if self.modulated else self.affine_mods(x)
        h = self.norm1(x) if mods is None else adaln(self.norm1, x, mods[0], mods[1])
        return self.qkv(h), mods

    def affine_mods(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """An unmodulated stream's affine LayerNorms as modulation vectors, shift = bias and scale = weight - 1 with
        gates of 1, so that its CPU inference runs a modulated stream's fused kernels (a shorter encode at paper-256:
        benchmarks/README.md, "Encode"); None off the optimised path (the norms run as modules)."""
        if not _fast_cpu_inference(x):
            return None
        norms = (self.norm1,) if self.pre_only else (self.norm1, self.norm2)
        one = torch.ones(1, x.shape[-1], device=x.device)
        return tuple(v for n in norms for v in (n.bias[None], n.weight[None] - 1, one))[:2 if self.pre_only else 6]

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The qkv projection (B, N, 3 W) -> q, k, v each (B, heads, N, head_dim), q and k normalised."""
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v

    def qk_norms(self) -> list[torch.Tensor]:
        return [self.q_norm.weight, self.q_norm.bias, self.k_norm.weight, self.k_norm.bias]

    def pre(self, x: torch.Tensor, c: torch.Tensor | None, mods: tuple[torch.Tensor, ...] | None = None):
        """(B, N, W) -> q, k, v each (B, heads, N, head_dim), plus the modulation vectors."""
        qkv, mods = self.pre_qkv(x, c, mods)
        return (*self.split_heads(qkv), mods)

    def post(self, x: torch.Tensor, attn: torch.Tensor, mods) -> torch.Tensor:
        """Residual attention output and MLP; attn is (B, N, W)."""
        if mods is None:
            x = x + self.proj(attn)
            return x + self.mlp(self.norm2(x))
        _, _, gate_a, shift_m, scale_m, gate_m = mods
        if (fused := gated_linear(self.proj, attn, x, gate_a)) is not None:
            x, h = fused, adaln(self.norm2, fused, shift_m, scale_m)  # the gated residual in the projection's epilogue
        else:
            x, h = gated_adaln(self.norm2, x, gate_a, self.proj(attn), shift_m, scale_m)
        return self.mlp(h, x, gate_m)


def joint_attention(qkv_x: torch.Tensor, qkv_c: torch.Tensor, img: Stream, ctx: Stream,
                    rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention over both streams from their qkv projections (B, N, 3 W) and (B, L, 3 W): q and k normalised
    per stream, RoPE over [image tokens, context tokens]; returns each stream's output, (B, N, W) and (B, L, W)."""
    if _fast_cpu_inference(qkv_x) and (out := cpu_kernels.joint_attention(
            qkv_x, qkv_c, img.heads, img.qk_norms() + ctx.qk_norms(), img.q_norm.eps, rope)) is not None:
        return out  # the fused kernel reads both projections in place
    (qx, kx, vx), (qc, kc, vc) = img.split_heads(qkv_x), ctx.split_heads(qkv_c)
    q = torch.cat([qx, qc], dim=2)  # (B, heads, N + L, head_dim)
    k = torch.cat([kx, kc], dim=2)
    v = torch.cat([vx, vc], dim=2)
    out = attention(q, k, v, rope)  # (B, N + L, W)
    n = qkv_x.shape[1]
    return out[:, :n], out[:, n:]


class JointBlock(Tracked, nn.Module):
    """MMDiT block over an image stream and a context stream with one joint attention."""

    def __init__(
        self, width: int, heads: int, mlp_hidden: int, modulated: bool,
        img_pre_only: bool = False, ctx_pre_only: bool = False,
    ) -> None:
        super().__init__()
        self.img = Stream(width, heads, mlp_hidden, modulated, img_pre_only)
        self.ctx = Stream(width, heads, mlp_hidden, modulated, ctx_pre_only)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
        mods: tuple | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # x: (B, N, W) image tokens, ctx: (B, L, W) context tokens, c: (B, W) conditioning or None;
        # mods: the two streams' modulation vectors (image, context), computed from c when not given
        mx, mc = mods or (None, None)
        qkv_x, mx = self.img.pre_qkv(x, c, mx)
        qkv_c, mc = self.ctx.pre_qkv(ctx, c, mc)
        out_x, out_c = joint_attention(qkv_x, qkv_c, self.img, self.ctx, rope)
        x = None if self.img.pre_only else self.img.post(x, out_x, mx)
        ctx = None if self.ctx.pre_only else self.ctx.post(ctx, out_c, mc)
        return x, ctx
