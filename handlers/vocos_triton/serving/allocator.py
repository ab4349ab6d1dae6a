"""Give freed heap memory back to the OS once a stub holds too much of it (glibc ``malloc_trim``).

glibc keeps the memory of freed activations for reuse, so without a limit a stub stays at the
high-water mark of the largest batch it ever ran (the EnCodec encoder stub more than doubles over
a long load test). Trimming is not free either: the next forward page-faults the memory back in, a
noticeable share of a vocoder forward, so trimming after every large forward costs throughput.

So a stub may keep ``retain_mb`` of anonymous memory above what it held after warm-up: a steady
load of bounded batches reuses its activations and never pays the faults, while a rare outsized
batch (the encoder on a long clip) or fragmentation over hours is given back right after the
forward that went over the limit.

glibc's own trimming is switched off for the same reason (:func:`hold_freed_memory`): by default it
gives the top of the heap back whenever a free leaves more than a few MB there, which is after
nearly every forward, and the next forward faults it back in (thousands of page faults per forward).

What a stub keeps for its next forwards it gives back once it has been idle for ``idle_release_s``
(:meth:`MemoryReleaser.release_when_idle`): after a burst, the server's memory returns to its size
before it, while a steady load never pays the refaults.

The measurements behind this policy are in docs/performance.md ("Heap policy").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
from typing import Callable, Optional, Union

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
#: the largest mmap threshold glibc allows on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger blocks are
#: mapped per allocation and unmapped on free, as before
MMAP_THRESHOLD_BYTES = 32 * 2**20
_NEVER_TRIM_BYTES = 2**31 - 1
#: seconds without a forward after which a stub gives back what it kept (config ``idle_release_s``)
IDLE_RELEASE_S = 5.0


@functools.cache  # loaded once per process, by whichever caller comes first
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for symbol in ("malloc_trim", "mallopt"):  # glibc only: AttributeError elsewhere
            getattr(libc, symbol)
        return libc
    except (OSError, AttributeError):
        return None


def trim_function() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` (give freed heap back to the OS), or None where there is no glibc."""
    libc = _glibc()
    return None if libc is None else libc.malloc_trim


def hold_freed_memory() -> bool:
    """Stop glibc from trimming the heap by itself; :class:`MemoryReleaser` decides instead.

    Setting the trim threshold also freezes glibc's adaptive mmap threshold, so it is set to the value
    the adaptation ends at anyway (32 MB): activations below it come from the heap, not from fresh
    mappings. Returns whether glibc took both settings.
    """
    libc = _glibc()
    return (libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES)))


def anonymous_resident_bytes(pid: Union[int, str] = "self") -> int:
    """Resident memory of this process (or of ``pid``) that is not file- or shared-memory-backed (the heap).

    Libraries and the Python backend's shared-memory tensors are excluded: trimming cannot shrink them.
    """
    with open(f"/proc/{pid}/statm") as statm:
        fields = statm.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE_BYTES


class MemoryReleaser:
    """Call :meth:`settle` once after warm-up and :meth:`after` after each execute; a trim happens
    when the heap has grown more than ``retain_mb`` beyond its size at :meth:`settle`.

    ``retain_mb`` < 0 leaves glibc's defaults alone and never trims; otherwise glibc's own trimming
    is switched off (:func:`hold_freed_memory`) from construction on.
    """

    def __init__(self, retain_mb: float, resident: Callable[[], int] = anonymous_resident_bytes) -> None:
        self.retain_bytes = int(retain_mb * 2**20)
        self._resident = resident
        libc = _glibc() if retain_mb >= 0 and hold_freed_memory() else None
        self._trim = libc.malloc_trim if libc is not None else None
        self.baseline = 0
        self.trims = 0
        self._last_active = time.monotonic()
        self._idle_trimmed = True  # nothing to give back before the first forward
        self._idle_thread: Optional[threading.Thread] = None

    def settle(self) -> None:
        """Take the current heap as the size the stub returns to (weights and warm-up state loaded)."""
        if self._trim is not None:
            self._trim(0)
            self.baseline = self._resident()

    def release(self) -> bool:
        """Give the freed heap back now (after dropping state that will not come back); False if disabled."""
        if self._trim is None:
            return False
        self._trim(0)
        self.trims += 1
        return True

    def after(self) -> bool:
        self._last_active, self._idle_trimmed = time.monotonic(), False
        if self._trim is None or self._resident() - self.baseline <= self.retain_bytes:
            return False
        self._trim(0)
        self.trims += 1
        return True

    def release_when_idle(self, idle_s: float, poll_s: float = 1.0) -> bool:
        """Start a daemon thread that gives the freed heap back once no :meth:`after` was called for
        ``idle_s`` (once per idle spell); False when trimming is disabled or ``idle_s`` <= 0."""
        if self._trim is None or idle_s <= 0 or self._idle_thread is not None:
            return False

        def watch() -> None:
            while True:
                time.sleep(poll_s)
                if not self._idle_trimmed and time.monotonic() - self._last_active >= idle_s:
                    self._idle_trimmed = True
                    if self._resident() > self.baseline:
                        self.release()

        self._idle_thread = threading.Thread(target=watch, name="heap-idle-release", daemon=True)
        self._idle_thread.start()
        return True
