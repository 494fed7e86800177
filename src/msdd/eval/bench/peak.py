"""The machine's own peak for a dtype: a large matmul, the fastest of the matmul kernels the models run (what
`fraction_of_peak` is measured against), and a 3x3 convolution probe reported beside it."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from msdd.eval.bench.timing import synchronizer
from msdd.models import cpu_kernels
from msdd.models.layers import BF16_PACKING, FP32_PACKING, ONEDNN_LINEAR


def peak_sizes(dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """The square products the probe times: n / 2 and n, n = 2048 (fp32) / 4096 (bf16) on CPU, twice that on
    CUDA. Both sizes, because neither is the fastest everywhere: oneDNN's packed bf16 kernel ran 4096^3 slower than
    2048^3, which runs at the rate the decoders' own shapes reach, so a 4096-only probe put a bf16 decode closer to
    the peak than it is (benchmarks/README.md, "How")."""
    n = 2048 if dtype == torch.float32 else 4096
    n = n * 2 if device.type == "cuda" else n
    return n // 2, n


@contextlib.contextmanager
def _num_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _best_gflops(fn: Callable[[], object], flops: int, device: torch.device, repeats: int) -> float:
    """GFLOP/s of the fastest of `repeats` timed calls of `fn` (after one untimed)."""
    sync = synchronizer(device)
    best = math.inf
    with torch.inference_mode():
        fn()
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def matmul_peaks(dtype: torch.dtype = torch.float32, threads: int | None = None,
                 device: torch.device | str = "cpu", n: int | None = None, repeats: int = 5,
                 only: str | None = None) -> dict[str, float]:
    """GFLOP/s of the best of `repeats` n x n @ n x n products (2 n^3 FLOPs each) per matmul kernel that the models here
    run: `torch.mm` (BLAS on the CPU) and, on the CPU where PyTorch has it, oneDNN's linear
    (`msdd.models.layers.Linear`'s fp32 inference kernel, faster than BLAS), also with the weight pre-packed as that
    layer packs it (bf16, float32), and msdd's own (`msdd.models.cpu_kernels.linear`, which the decoders' token layers
    run on the optimised CPU path; the fastest of them at 1024^3 float32 and 2048^3 bf16, slower at 4096^3 bf16:
    benchmarks/README.md, "How" and "The probe with msdd's own kernel, less Python per pass, the shipped models in the
    blocks op, where a batch-1 pass loses by op"); `only`: that kernel alone. Without n, each kernel's best over the
    sizes of `peak_sizes`."""
    device = torch.device(device)
    if n is None:
        by_size = [matmul_peaks(dtype, threads, device, size, repeats, only) for size in peak_sizes(dtype, device)]
        return {name: max(peaks[name] for peaks in by_size) for name in by_size[0]}
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and ONEDNN_LINEAR:
        kernels["onednn linear"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        if BF16_PACKING if dtype == torch.bfloat16 else (dtype == torch.float32 and FP32_PACKING):
            packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
            kernels["onednn linear, packed"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none",
                                                                                          [], "")
    if only in (None, "msdd linear") and device.type == "cpu" and (panels := cpu_kernels.pack_linear(b, None)):
        kernels["msdd linear"] = lambda: cpu_kernels.linear(a, *panels)  # a b^T: the same 2 n^3 FLOPs
    if only is not None:
        kernels = {only: kernels[only]}
    with _num_threads(threads):
        return {name: _best_gflops(fn, 2 * n**3, device, repeats) for name, fn in kernels.items()}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, threads: int | None = None,
                        device: torch.device | str = "cpu", n: int | None = None, repeats: int = 5) -> float:
    """The machine's matmul peak in GFLOP/s for `dtype`: the fastest kernel of `matmul_peaks`."""
    return max(matmul_peaks(dtype, threads, device, n, repeats).values())


def measure_conv_peak(dtype: torch.dtype = torch.float32, threads: int | None = None,
                      device: torch.device | str = "cpu", channels: int = 512, size: int = 32,
                      repeats: int = 5) -> float:
    """GFLOP/s of a 3x3 convolution, channels -> channels on size x size (the SD-VAE decoder's main op).
    Reported beside the matmul peak: on some CPUs convolutions run on faster kernels (oneDNN) than
    matmuls (BLAS), so a convolutional decoder can exceed the "matmul peak"."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, size, size, generator=g).to(device, dtype)  # (1, C, H, W)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device, dtype)
    with _num_threads(threads):
        return _best_gflops(lambda: F.conv2d(x, w, padding=1), 2 * size * size * channels * channels * 9,
                            device, repeats)
