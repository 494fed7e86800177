"""msdd.malloc: the glibc malloc settings the `msdd` command applies, and where it leaves glibc alone. Each case runs
in a fresh interpreter: the settings are process-wide."""

import os
import platform
import subprocess
import sys

import pytest

from msdd import malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
OURS = ("MSDD_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _tune_in_fresh_process(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in OURS}
    code = "from msdd import malloc; print(malloc.tune(), malloc.settings())"
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
@pytest.mark.parametrize("env", [{}, {"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1024"}])  # not malloc's
def test_tune_sets_its_settings_and_reports_them(env):
    applied = {"mmap_threshold": malloc.MMAP_THRESHOLD, "trim_threshold": malloc.TRIM_THRESHOLD,
               "mmap_max": malloc.MMAP_MAX}
    assert _tune_in_fresh_process(**env) == f"{applied} {applied}"


@pytest.mark.parametrize("env", [{"MSDD_MALLOC": "glibc"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"MALLOC_MMAP_MAX_": "8"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_tune_leaves_glibc_alone_when_told_or_already_set(env):
    assert _tune_in_fresh_process(**env) == "None None"
