"""Peak memory of one call beyond what was in use before it (activations and workspaces, not weights).

CUDA: `torch.cuda.max_memory_allocated` after a reset, minus the memory allocated before the call.
CPU (Linux): the process's resident-set high-water mark (VmHWM in /proc/self/status), reset by writing 5
to /proc/self/clear_refs, minus the resident set before the call. glibc keeps freed memory for reuse
(an earlier call's activations would then count as "in use before"), so the probe first returns it to
the system (`malloc_trim`). Elsewhere: None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Callable

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: the peak may then be under-counted
        pass
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def call_with_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[object, float | None]:
    """(fn(), peak MiB that the call added to what was in use before it, or None where not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if device.type != "cpu" or not _STATUS.exists() or not _reset_rss_peak():
        return fn(), None
    before = _status_kib("VmRSS")
    out = fn()
    return out, max(0, _status_kib("VmHWM") - before) / 1024
