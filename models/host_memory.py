"""Keep freed host memory in the process, so that steps do not page-fault it back in.

glibc's malloc serves a large allocation from a fresh memory mapping and unmaps it when
freed; it also hands the top of its heap back to the OS once enough of it is free. A
model step on the CPU allocates and frees tens of megabytes of activations, so every
step that is bigger than the ones just before it (a burst of prompts after decodes) maps
them anew, and the kernel zero-fills each 4 KiB page at its first touch. In a VM a fault
is expensive: here the first 943-token prefill after a run of decodes took 3,000 to
200,000 page faults and 1.8 to 2.6 s; with this setting it took
none once the process had run one such step, and 1.8 to 2.1 s.
Decode steps, which allocate little, do not change.

It is what preloading tcmalloc or jemalloc does for PyTorch on the CPU (vLLM's CPU
backend recommends that), without touching the environment: glibc's ``mallopt``, called
once per process. The price is that the process keeps its peak activation memory.

Measured where the engine steps on the main thread (the simulator's real runs, the
benchmarks). A server that steps it from a worker thread allocates from another glibc
arena, whose sub-heaps are unmapped once wholly free whatever the trim threshold; that
case is not measured.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling (32 MiB on 64-bit systems, 16 on 32-bit): blocks this big or bigger are always mapped.
_MMAP_THRESHOLD_MAX = 4 * 2**20 * ctypes.sizeof(ctypes.c_long)
_TRIM_THRESHOLD = 2**30  # free heap top kept before any is given back


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks below 32 MiB from its heap and to keep the heap's free top.

    Returns whether the C library accepted both settings: False where there is no
    ``mallopt`` (macOS, musl, Windows), whose allocators keep their own policy.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = [mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)]
    return all(accepted)
