"""Host allocator tuning for CPU training: freed buffers stay in the process for the next step.

glibc's malloc serves blocks above its mmap threshold (128 KiB, rising to at most 32 MiB) with fresh
`mmap` calls and hands them back to the kernel on `free`. A training step allocates and frees the
same activation, logit and gradient buffers every step, so without tuning each step page-faults and
zeroes tens of megabytes again. Raising the mmap and trim thresholds keeps those pages in the heap,
the in-process equivalent of running under jemalloc or tcmalloc. The peak resident size is unchanged;
memory is simply not returned to the system between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
RETAIN_BYTES = 1 << 30  # blocks below this come from the heap; up to this much free heap is kept


@functools.cache
def retain_freed_memory() -> bool:
    """Tune glibc malloc to keep freed memory for reuse; False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, RETAIN_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, RETAIN_BYTES))
