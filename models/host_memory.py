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
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems: larger blocks are always mapped
_TRIM_THRESHOLD = 2**30  # free heap top kept before any is given back


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks up to 32 MiB from its heap and to keep the heap's free top.

    Returns whether it took the settings: False where the C library is not glibc (macOS,
    musl, Windows), which then keeps its own policy.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
