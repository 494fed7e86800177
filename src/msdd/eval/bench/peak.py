"""The machine's own peak for a dtype: a large matmul (what `fraction_of_peak` is measured against) and a 3x3
convolution probe reported beside it."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from msdd.eval.bench.timing import synchronizer


def peak_size(dtype: torch.dtype, device: torch.device) -> int:
    n = 2048 if dtype == torch.float32 else 4096
    return n * 2 if device.type == "cuda" else n


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


def measure_matmul_peak(dtype: torch.dtype = torch.float32, threads: int | None = None,
                        device: torch.device | str = "cpu", n: int | None = None, repeats: int = 5) -> float:
    """The machine's matmul peak in GFLOP/s for `dtype`: the best of `repeats` n x n @ n x n products
    (2 n^3 FLOPs each); n defaults to 2048 (fp32) / 4096 (bf16) on CPU, twice that on CUDA."""
    device = torch.device(device)
    n = n or peak_size(dtype, device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    with _num_threads(threads):
        return _best_gflops(lambda: torch.mm(a, b), 2 * n**3, device, repeats)


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
