"""Hand freed heap memory back to the OS (glibc `malloc_trim`), rate-limited.

A serving process frees most of what a step allocates, but glibc keeps freed
chunks in its arenas, so RSS ratchets up with fragmentation (~100 MiB over a
10k-request soak here). The engine thread calls `maybe_trim` between steps:
right away when it goes idle, and at most once a minute while busy (a trim of
a ~500 MiB heap costs a few ms). Without glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import logging
import time

log = logging.getLogger(__name__)

IDLE_INTERVAL_S = 5.0
BUSY_INTERVAL_S = 60.0


def _load_malloc_trim():
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    def __init__(self, clock=time.monotonic):
        self._trim = _load_malloc_trim()
        self._clock = clock
        self._last = clock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self, idle: bool) -> bool:
        """Trim if the interval for this state has passed; True when it trimmed."""
        if self._trim is None:
            return False
        now = self._clock()
        if now - self._last < (IDLE_INTERVAL_S if idle else BUSY_INTERVAL_S):
            return False
        self._last = now
        self._trim(0)
        self.trims += 1
        return True
