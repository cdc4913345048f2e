"""Settings of the host process that large tensor work on a CPU depends on."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

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


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks so far of `cpus`, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def idle_cpus(sample_s: float = 0.2) -> int:
    """CPUs this process may use that are not busy with other work right now (at least 1).

    Measured over `sample_s` seconds of /proc/stat while this process waits (so its own work
    does not count), on the CPUs it is allowed on; where /proc/stat is missing, the 1-minute
    load average stands in (it lags: a job that just ended still counts)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    allowed = len(cpus)
    before = _cpu_ticks(cpus)
    if before is not None:
        time.sleep(sample_s)
        after = _cpu_ticks(cpus)
        if after is not None and after[1] > before[1]:
            busy = allowed * (after[0] - before[0]) / (after[1] - before[1])
            return max(1, min(allowed, int(allowed - busy + 0.5)))
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    return max(1, min(allowed, int(allowed - load + 0.5)))


def set_cpu_threads(threads: int | None) -> int:
    """Torch's intra-op threads for CPU work: `threads`, or by default one per idle CPU.

    Torch's own default (one per core) assumes the cores are free. When another process keeps
    one busy, every parallel op waits for the thread that shares its core: on a 2-core machine
    CPU decoding ran ~18x slower per token with two threads than with one."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    n = threads or min(torch.get_num_threads(), idle_cpus())
    torch.set_num_threads(n)
    return n
