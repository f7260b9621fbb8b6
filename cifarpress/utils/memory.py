"""This process's resident memory from /proc (Linux), with getrusage as the fallback elsewhere."""
from __future__ import annotations

import resource


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's own resident high-water mark. Not ru_maxrss: on Linux that survives fork+exec, so a
    worker started by a large parent (a recipe run) would report the parent's peak, not the model's."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


GLIBC_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
RELEASE_THRESHOLD_BYTES = 128 * 1024


def release_freed_buffers(threshold: int = RELEASE_THRESHOLD_BYTES) -> bool:
    """Make glibc hand every freed buffer of `threshold` bytes or more back to the OS at once, for the rest of
    this process. True when it took effect; False where the C library is not glibc.

    glibc's default mmap threshold grows to the largest buffer freed (up to 32 MiB), so activation-sized
    buffers then come from the heap, and a heap fragmented by many small long-lived blocks (8-bit copies of
    activations) keeps its freed holes resident: the process's resident set stays near plain training's
    although far less is live. A fixed threshold maps each large buffer on its own and unmaps it on free, so
    the resident set follows live memory, at the cost of a page fault per fresh page.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(GLIBC_M_MMAP_THRESHOLD, int(threshold)))
