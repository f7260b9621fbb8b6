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
