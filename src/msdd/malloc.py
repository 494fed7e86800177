"""glibc malloc settings for CPU decoding, applied by the `msdd` command (`tune`).

A decode allocates and frees activations of several MB in every layer. Under glibc's defaults the larger ones get
fresh pages of their own (mmap), and the heap's free top goes back to the system after each spell of large blocks,
so the next allocation faults its pages in again, many times per float32 student decode (far fewer times in bf16,
whose activations are half the size). `tune` serves every block from the heap (no mmap; glibc would still map
blocks above 32 MiB, its largest mmap threshold, and a batch-16 decode has many, each faulted in again at every
layer) and returns the heap's free top to the system only beyond 256 MiB. The cost is memory kept after a large
decode: what its freed blocks leave below the heap's top stays with the process for the next one, given back once a
smaller job's frees reach the top (benchmarks/README.md, "Gated residuals prefetched, glibc malloc tuned, and what
did not help" and "Batch 16: inputs in chunks, and no mmap").

Library users opt in with `msdd.malloc.tune()`; `MSDD_MALLOC=glibc` keeps glibc's own behaviour in the command too,
and glibc's own malloc settings (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`,
`glibc.malloc.*` in `GLIBC_TUNABLES`) take precedence."""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "MSDD_MALLOC"
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit systems
MMAP_MAX = 0  # blocks glibc may map at once: none, every block from the heap
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
_GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")

_applied: dict[str, int] | None = None


def tune(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
         mmap_max: int = MMAP_MAX) -> dict[str, int] | None:
    """Set glibc malloc's mmap threshold, trim threshold and the number of blocks it may map for this process (module
    docstring); returns the settings now in force, or None where they are not applied: not glibc, `MSDD_MALLOC=glibc`,
    or glibc settings given by the environment."""
    global _applied
    if (os.environ.get(ENV, "tuned") == "glibc" or any(os.environ.get(k) for k in _GLIBC_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
        return _applied
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
            and mallopt(_M_MMAP_MAX, mmap_max) == 1):
        _applied = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold, "mmap_max": mmap_max}
    return _applied


def settings() -> dict[str, int] | None:
    """What `tune` set in this process, None if it set nothing (glibc's defaults, or the environment's)."""
    return _applied
