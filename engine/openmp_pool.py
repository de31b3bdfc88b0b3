"""Free the calling thread's OpenMP worker team before another thread takes over the compute.

torch's CPU ops (and our GGUF kernels, through `at::parallel_for`) run on OpenMP. Each
thread that starts a parallel region owns a team of worker threads, kept for reuse. The
server loads and warms the model on the main thread, then the engine thread runs every
step: with the main thread's team still alive, libgomp has more managed threads than
cores and makes its workers sleep almost at once between parallel regions, so the
engine thread's ops ran ~1.5x slower on this 2-core machine (a 16 x 576 x 1536 matmul:
165 us on the main thread, 270 us on a second thread; 160 us after the main thread's
team was freed; the model's decode step through the server: 104 ms vs 58 ms offline).

`release_openmp_pool()` calls OpenMP 5's `omp_pause_resource_all(omp_pause_soft)` in the
OpenMP runtime loaded by torch, which frees the calling thread's team (a later parallel
region on that thread would build a new one). Without such a runtime it does nothing.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_RUNTIME_NAMES = ("libgomp", "libiomp", "libomp")


def _loaded_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux), torch's first."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = dict.fromkeys(line.split()[-1] for line in maps.splitlines()
                          if any(n in line.rsplit("/", 1)[-1] for n in _RUNTIME_NAMES) and "/" in line)
    return sorted(paths, key=lambda p: "torch" not in p)


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP team; True when a runtime did it."""
    for path in _loaded_runtimes():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(OMP_PAUSE_SOFT) == 0:
            log.debug("freed this thread's OpenMP team (%s)", path)
            return True
    return False
