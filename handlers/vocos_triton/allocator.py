"""Give the heap back to the OS after large forwards (glibc ``malloc_trim``).

A forward over a long batch allocates hundreds of MB of activations; glibc keeps most of it after
they are freed, so a stub's memory stays at the high-water mark of the largest batch it ever ran
(the EnCodec encoder stub: 250 MB idle, 650 MB after a 10-minute load test). Trimming after such a
forward costs a few milliseconds (plus page faults when the next large forward touches the memory
again), so it runs only after forwards of at least ``threshold_frames`` padded frames and at most
once per ``min_interval_s``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable, Optional


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


class MemoryReleaser:
    """``after(padded_frames)`` after each execute; trims when the work was large and enough time passed."""

    def __init__(self, threshold_frames: int, min_interval_s: float = 1.0) -> None:
        self.threshold_frames = threshold_frames
        self.min_interval_s = min_interval_s
        self._trim = _malloc_trim() if threshold_frames > 0 else None
        self._last = float("-inf")
        self.trims = 0

    def after(self, padded_frames: int) -> bool:
        if self._trim is None or padded_frames < self.threshold_frames:
            return False
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return False
        self._trim(0)
        self._last = now
        self.trims += 1
        return True
