"""Settings of the host process that large tensor work on a CPU depends on."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory (up to 1 GiB per block) for reuse instead of handing it back.

    By default glibc gives every allocation above a few MB a fresh mapping and returns it on free,
    so each large temporary tensor is page-faulted in again: an elementwise op on a 100 MB fp32
    tensor took 48 ms instead of 7.5 ms on a 2-core machine, which made elementwise work cost as
    much as the matmuls while quantizing. The process keeps its high-water mark of memory instead.
    Returns whether the setting took (False off Linux/glibc: nothing to do there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BYTES - 1))
