"""What machine a benchmark ran on: CPU model, x86-64 instruction-set level, load; shared by the scripts."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: The psABI x86-64 microarchitecture levels, by the /proc/cpuinfo flags each adds (glibc's table).
X86_64_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
VECTOR_PREFIXES = ("sse", "ssse", "avx", "fma", "amx", "f16c", "asimd", "sve")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def isa_level(flags: set[str] | None = None) -> str:
    """The highest x86-64 level whose flags are all present (``x86-64`` baseline), or the machine type."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine() not in ("x86_64", "AMD64"):
        return platform.machine()
    level = "x86-64 (baseline)"
    for name, needed in X86_64_LEVELS:
        if not needed <= flags:
            break
        level = name
    return level


def machine_line() -> str:
    flags = cpu_flags()
    vector = sorted(f for f in flags if f.startswith(VECTOR_PREFIXES))
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, {isa_level(flags)} "
            f"({'AVX-512' if 'avx512f' in flags else 'no AVX-512'}; vector flags: {' '.join(vector)}), "
            f"{platform.system()} {platform.release()}")


def wait_for_quiet(max_load: float, poll_s: float = 30.0, max_wait_s: float = 600.0) -> float:
    """Poll the 1-minute load average until it drops to ``max_load``; give up (and say so) after a while."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = os.getloadavg()[0]
        if load <= max_load:
            logger.info("load average %.2f <= %.2f: starting", load, max_load)
            return load
        if time.monotonic() >= deadline:
            logger.warning("load average still %.2f after %.0f s; measuring anyway (noisy figures)", load, max_wait_s)
            return load
        logger.info("load average %.2f > %.2f: another job is running, waiting %.0f s", load, max_load, poll_s)
        time.sleep(poll_s)
