"""Fused CPU kernels for inference, built on first use: attention (with RoPE), adaLN, SwiGLU's gate, linear layers.

PyTorch's CPU flash-attention kernel runs bf16 far below the bf16 matmul rate on CPUs without AMX, and float32 below
the float32 rate (benchmarks/README.md, "How far the efficiency targets are: `profile_student.py --bound`"):
attention was the whole gap between a paper-256 decode and the machine's peak. `kernels/cpu_kernels.cpp` computes the
same attention with the same precision (bf16: bf16 products summed in float32, float32 softmax, bf16 probabilities;
float32: float32 throughout) on AVX-512, RoPE on queries and keys included, faster than the flash kernel at the paper
decoder's 144-1152 tokens, in bf16 most (`benchmarks/attention_kernels.py`; benchmarks/README.md, "Fused CPU
kernels"). An MMDiT block's joint attention reads its two streams' qkv projections in place, with their q_norm and
k_norm applied while packing, and writes each stream's output: no split, concatenation, normalisation or slicing ops
around it. adaLN computes LayerNorm and modulation (and the gated residual before it) in one pass, SwiGLU's
silu(a) * b in one pass over the first linear layer's output. Linear layers on token sequences run the attention's
products too (`pack_linear` once per weight, then `linear`: faster than oneDNN's packed kernel at the decoder's
shapes, weights cold as in a decode), with SwiGLU's gate computed from the first layer's float32 sums where the layer
is an MLP's first, and an MMDiT stream's gated residual x + gate * layer(y) added to the sums of its output projection
and second MLP layer (no pass over the residual stream after them; the adaLN kernel's gated residual remains where
those cannot); `linear_int8` is the same on int8 weights and per-row int8 inputs (VNNI, exact int32 sums; faster than
the bf16 kernel, `msdd.models.precision.Int8Linear`). All of them compute in float32 and round once. `blocks` runs a
decoder pass's MMDiT blocks with these kernels in one call (`msdd.models.fused_blocks`): no Python between a pass's
150 kernel calls, whose Python and dispatch were a visible share of a paper-256 student decode.

The library is built with `torch.utils.cpp_extension` the first time a CPU decode needs it (a one-time compile, timed
in README.md; cached in `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`, one folder per installed
source path, rebuilt when the source changes) and used by
`msdd.models.layers` on the optimised path only (the `student-eager` row of `msdd bench` keeps PyTorch's ops).
Where the CPU lacks AVX512-BF16 or AVX512-VNNI, a shape does not fit (head dimension or hidden width not a multiple
of 32, head dimension above 256; float32 attention under 128 tokens) or the build fails (no C++ compiler or ninja:
one warning says so), those layers use PyTorch's ops. `MSDD_CPU_KERNELS=0` (or off, false, no) switches the kernels off;
`MSDD_CPU_KERNELS=phases` builds and loads a variant whose `blocks` op also clocks its phases (`phase_times`, for
`benchmarks/profile_student.py --phases`; the same kernels, two clock reads per phase).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "cpu_kernels.cpp"
ENV = "MSDD_CPU_KERNELS"
DTYPES = (torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # the kernels' row buffers (kMaxHeadDim)
MIN_TOKENS_FP32 = 128  # float32 attention below: no reliable gain over the flash kernel, run to run
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma", "-fopenmp"]
# the blocks op's phases as `phase_times` returns them (the Phase enum of kernels/cpu_kernels.cpp): the adaLN kernels,
# the qkv layers (with q / k norm, RoPE and the attention's packing where they write it packed), the attention, the
# output projections (with their gated residuals), the MLPs' first layers (with SwiGLU's gate), their second layers
PHASES = ("adaln", "qkv", "attention", "proj", "mlp1", "mlp2")


def cpu_supported() -> bool:
    """The CPU runs AVX512-BF16 and AVX512-VNNI (read from /proc/cpuinfo: Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return all(flag in flags for flag in CPU_FLAGS)


OFF = ("0", "off", "false", "no")
ON = ("", "1", "on", "true", "yes", "phases")


def enabled() -> bool:
    """The kernels are on unless MSDD_CPU_KERNELS is one of `OFF` (any case); a value in neither list is an error."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in OFF + ON:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not understood: set it to 0 (or off) to use PyTorch's ops, "
                         "1 (or on) for the kernels, or phases for the kernels with phase clocks")
    return value not in OFF


@functools.cache
def library():
    """The compiled ops (`torch.ops.msdd_kernels`: `attention`, `joint_attention`, `adaln`, `gated_adaln`,
    `swiglu`, `pack_linear`, `linear`, `linear_int8`, `blocks`, `chunk_bytes`; with `MSDD_CPU_KERNELS=phases` also
    `phase_times`),
    or None where they cannot run here."""
    if not (enabled() and cpu_supported()):
        return None
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")  # its import logs a CUDA_HOME notice on CPU hosts
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        _ninja_on_path()
        from torch.utils import cpp_extension

        phases = os.environ.get(ENV, "").strip().lower() == "phases"
        # one build folder per source path: its build file names the path, so two checkouts (or installs) under one
        # name rebuilt each other's library (a full compile) at each one's first decode
        where = hashlib.sha256(str(SOURCE.resolve()).encode()).hexdigest()[:8]
        name = f"msdd_cpu_kernels{'_phases' if phases else ''}_{where}"
        cpp_extension.load(name=name, sources=[str(SOURCE)],
                           extra_cflags=CFLAGS + (["-DMSDD_PHASE_TIMES"] if phases else []), extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as err:  # no compiler, no ninja, a failed build: PyTorch's ops instead
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"msdd: the fused CPU kernels ({SOURCE.name}) could not be built ({reason}); CPU decodes "
                      f"use PyTorch's ops instead. Install a C++ compiler and ninja, or set {ENV}=0 to skip "
                      f"the build.", RuntimeWarning, stacklevel=2)
        return None
    finally:
        cpp_logger.setLevel(level)
    return torch.ops.msdd_kernels


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH: add the pip package's binary (a dependency of msdd) when
    the environment's bin directory is not on PATH (a virtual environment used without activating it)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _attention_fits(device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int) -> bool:
    """The kernels compute an attention of these, and faster than PyTorch's: on the CPU, bf16 or float32 (float32
    from 128 tokens on), head dim a multiple of 32 up to 256."""
    return (device.type == "cpu" and dtype in DTYPES and head_dim % 32 == 0 and head_dim <= MAX_HEAD_DIM
            and (dtype == torch.bfloat16 or tokens >= MIN_TOKENS_FP32))


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel computes this attention, and faster than PyTorch's: tensors of one shape (B, heads, N, D) and one
    dtype that `_attention_fits`."""
    return (q.dim() == 4 and q.dtype == k.dtype == v.dtype and q.shape == k.shape == v.shape
            and _attention_fits(q.device, q.dtype, q.shape[-1], q.shape[2]))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D)) v as (B, N, heads * D) from the fused kernel, with RoPE on q and k first where
    `rope` (cos, sin, each (N, D), as msdd.models.layers.apply_rope takes them) is given; None where the kernel
    does not apply."""
    if not attention_applies(q, k, v) or (ops := library()) is None:
        return None
    return ops.attention(q, k, v) if rope is None else ops.attention(q, k, v, *rope)


def joint_attention(qkv0: torch.Tensor, qkv1: torch.Tensor, heads: int, norms: list[torch.Tensor], eps: float,
                    rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An MMDiT block's joint attention from its streams' qkv outputs qkv0 (B, N0, 3 W) and qkv1 (B, N1, 3 W): q and k
    of each stream LayerNormed per head (`norms`: q weight, q bias, k weight, k bias of stream 0, then of stream 1;
    `eps` theirs), RoPE (cos, sin (N0 + N1, D)) on the joint sequence, attention, each stream's output (B, N_s, W);
    None where the kernel does not apply (`_attention_fits`)."""
    applies = qkv0.dtype == qkv1.dtype and _attention_fits(qkv0.device, qkv0.dtype, qkv0.shape[-1] // (3 * heads),
                                                           qkv0.shape[1] + qkv1.shape[1])
    if not applies or (ops := library()) is None:
        return None
    return ops.joint_attention(qkv0, qkv1, heads, norms, eps, *rope)


def blocks(x: torch.Tensor, ctx: torch.Tensor, params: list[torch.Tensor], full: list[int], heads: int, eps: float,
           qk_eps: float, rope: tuple[torch.Tensor, torch.Tensor], int8: bool = False) -> torch.Tensor | None:
    """The image tokens x (B, N, W) after a decoder's MMDiT blocks, in one call (the `blocks` op in
    kernels/cpu_kernels.cpp says what `params` and `full` hold; msdd.models.fused_blocks gathers them); ctx
    (B, L, W) the context tokens, both in the dtype the matmuls compute in (`int8`: around the int8 products of the
    layers, packed by `pack_linear_int8`); None where the kernels do not apply."""
    width, tokens = x.shape[-1], x.shape[1] + ctx.shape[1]
    if not (width % 16 == 0 and width % heads == 0 and _attention_fits(x.device, x.dtype, width // heads, tokens)):
        return None
    if (ops := library()) is None:
        return None
    return ops.blocks(x, ctx, params, full, heads, eps, qk_eps, *rope, x.dtype == torch.bfloat16, int8)


def _adaln_applies(x: torch.Tensor, *mods: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 3 and x.dtype in DTYPES and x.shape[-1] % 16 == 0
            and all(m.dtype in DTYPES and m.dim() == 2 and m.shape[0] in (1, x.shape[0]) for m in mods))


def adaln(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor | None:
    """LayerNorm(x) (no affine weights) * (1 + scale) + shift for x (B, N, W), shift and scale (1 or B, W), in the
    dtype PyTorch's ops give; None where the kernel does not apply (W not a multiple of 16, not bf16 / float32)."""
    if not _adaln_applies(x, shift, scale) or (ops := library()) is None:
        return None
    return ops.adaln(x, shift, scale, eps)


def gated_adaln(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gated residual x' = x + gate * y and `adaln(x', shift, scale)`, both in the dtypes PyTorch's ops give;
    None where the kernel does not apply."""
    if not (_adaln_applies(x, gate, shift, scale) and y.shape == x.shape and y.dtype in DTYPES) or (
            ops := library()) is None:
        return None
    return ops.gated_adaln(x, gate, y, shift, scale, eps)


def linear_fits(weight: torch.Tensor, swiglu: bool = False) -> bool:
    """`linear` computes a layer of this weight (N, K): bf16 or float32 on the CPU, N a multiple of 64 (128 with
    `swiglu`), K even."""
    return (weight.device.type == "cpu" and weight.dtype in DTYPES and weight.dim() == 2
            and weight.shape[0] % (128 if swiglu else 64) == 0 and weight.shape[1] % 2 == 0)


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A weight (N, K) and bias (N,) or None in `linear`'s layout (with `swiglu`, a SwiGLU MLP's first layer [a | b]):
    (packed weight, float32 bias); None where the kernel does not apply (`linear_fits`)."""
    if not linear_fits(weight, swiglu) or (ops := library()) is None:
        return None
    return ops.pack_linear(weight, bias, swiglu)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, swiglu: bool = False,
           residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., K) through a layer packed by `pack_linear` (bf16 x for a bf16 weight, float32 for float32): (..., N), or
    the SwiGLU gate silu(a) * b (..., N / 2) with `swiglu`, in x's dtype; with `residual` (x's dtype, (..., N)) and
    `gate` (N values), residual + gate * (..., N) in the same pass, rounded once. None where the kernels are off (a
    layer packed before they were switched off: `MSDD_CPU_KERNELS=0` and `library.cache_clear()` in a process)."""
    return None if (ops := library()) is None else ops.linear(x, packed, bias, swiglu, residual, gate)


def pack_linear_int8(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """An int8 weight (N, K) with its scales (N,) (the layer's weight ~ weight * scale[:, None]) and bias in
    `linear_int8`'s layout: (packed weight, scales, compensations, bias), the last three in the panels' feature
    order; None where the kernel does not apply (N a multiple of 64, 128 with `swiglu`; K of 4)."""
    n, k = weight.shape
    if (weight.dtype != torch.int8 or weight.device.type != "cpu" or n % (128 if swiglu else 64) or k % 4
            or (ops := library()) is None):
        return None
    packed, bias = ops.pack_linear(weight, bias, swiglu)
    order = torch.arange(n).view(2, n // 64, 32).transpose(0, 1).reshape(-1) if swiglu else torch.arange(n)
    comp = (128 * weight.sum(1, dtype=torch.int32))[order].contiguous()
    return packed, scale.float()[order].contiguous(), comp, bias


def linear_int8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, comp: torch.Tensor, bias: torch.Tensor,
                swiglu: bool = False, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., K), bf16 or float32, through an int8 layer packed by `pack_linear_int8`: x quantised per row to int8
    (symmetric, round(x * 127 / max |x_r|)), exact int32 sums (AVX512-VNNI), scaled back in float32 and rounded once
    to x's dtype: (..., N), or the SwiGLU gate (..., N / 2) with `swiglu`; `residual` and `gate` as `linear`'s; None
    as `linear`'s."""
    return None if (ops := library()) is None else ops.linear_int8(x, packed, scale, comp, bias, swiglu, residual, gate)


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """silu(a) * b for h = [a, b] along the last dimension (..., 2 * hidden), computed in float32 and rounded once;
    None where the kernel does not apply (not a bf16 or float32 CPU tensor, hidden not a multiple of 16)."""
    if not (h.device.type == "cpu" and h.dtype in DTYPES and h.shape[-1] % 32 == 0) or (ops := library()) is None:
        return None
    return ops.swiglu(h)


def phase_times() -> dict[str, float]:
    """Seconds the `blocks` op spent in each of `PHASES` since the previous call, summed over its calls; the library
    must be the `MSDD_CPU_KERNELS=phases` variant (set before the first CPU decode of the process)."""
    ops = library()
    if ops is None or not hasattr(ops, "phase_times"):
        raise RuntimeError(f"phase_times needs the kernels built with their phase clocks: set {ENV}=phases before "
                           "the process's first CPU decode (x86 with AVX512-BF16 and VNNI, a C++ compiler)")
    return dict(zip(PHASES, ops.phase_times()))
