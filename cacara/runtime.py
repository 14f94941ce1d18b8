"""Process-wide runtime settings for the entry points (CLI, service, benchmarks), never for library code.

glibc hands every allocation above its mmap threshold straight back to the OS when freed. A CNN's
activations are exactly that size, so each layer pays page faults again: measured on 2 cores, 32
ten-second clips through YAMNet took 1.26 s with glibc's defaults and 0.72 s with the settings below
(benchmarks/yamnet_speed.py). Raising the thresholds makes the allocator reuse that memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024   # glibc's maximum on 64-bit
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024

_done = False


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; False where there is no glibc (macOS, musl)."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here; allocator left as it is")
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _done
