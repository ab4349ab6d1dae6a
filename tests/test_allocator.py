"""Giving freed heap back to the OS: only when a stub holds more than its allowance, and for real."""
from __future__ import annotations

import json
import subprocess
import sys

from vocos_triton.serving.allocator import MemoryReleaser

MIB = 2**20


class FakeHeap:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self) -> int:
        return self.size


def test_trims_only_when_the_heap_outgrows_its_allowance():
    heap = FakeHeap(300 * MIB)
    releaser = MemoryReleaser(retain_mb=100, resident=heap)
    releaser.settle()
    assert releaser.baseline == 300 * MIB
    heap.size = 400 * MIB  # exactly the allowance: kept for the next forward
    assert not releaser.after()
    heap.size = 400 * MIB + 1
    assert releaser.after()
    assert releaser.trims == 1


def test_negative_allowance_never_trims():
    heap = FakeHeap(0)
    releaser = MemoryReleaser(retain_mb=-1, resident=heap)
    releaser.settle()
    heap.size = 10**12
    assert not releaser.after() and releaser.trims == 0


# Run in a fresh interpreter: the releaser switches glibc's own trimming off for the whole process.
_REAL_HEAP = """
import ctypes, json
from vocos_triton.serving.allocator import MemoryReleaser, anonymous_resident_bytes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
releaser = MemoryReleaser(retain_mb=16)
releaser.settle()
chunk = 64 * 1024  # below glibc's mmap threshold: heap memory
chunks = [libc.malloc(chunk) for _ in range(64 * 2**20 // chunk)]
for address in chunks:
    ctypes.memset(address, 1, chunk)  # touched: resident
for address in chunks:  # all of it, the top of the heap included
    libc.free(address)
held = anonymous_resident_bytes() - releaser.baseline
trimmed = releaser.after()
print(json.dumps({"held": held, "trimmed": trimmed, "after": anonymous_resident_bytes() - releaser.baseline,
                  "again": releaser.after()}))
"""


def test_glibc_keeps_freed_heap_until_the_releaser_trims_it():
    result = json.loads(subprocess.run([sys.executable, "-c", _REAL_HEAP], check=True, capture_output=True,
                                       text=True).stdout)
    assert result["held"] > 48 * MIB, f"glibc gave freed memory back by itself: {result}"
    assert result["trimmed"], "64 MiB freed is over the 16 MiB allowance"
    assert result["after"] < 16 * MIB, f"trim left too much resident: {result}"
    assert not result["again"], "back under the allowance: no second trim"


_IDLE_HEAP = """
import ctypes, json, time
from vocos_triton.serving.allocator import MemoryReleaser, anonymous_resident_bytes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
releaser = MemoryReleaser(retain_mb=1024)  # far more than the forward below: after() keeps it all
releaser.settle()
assert releaser.release_when_idle(0.5, poll_s=0.05)
chunk = 64 * 1024
chunks = [libc.malloc(chunk) for _ in range(64 * 2**20 // chunk)]
for address in chunks:
    ctypes.memset(address, 1, chunk)
for address in chunks:
    libc.free(address)
kept = releaser.after()
busy = anonymous_resident_bytes() - releaser.baseline
time.sleep(0.2)  # not idle long enough yet
early = anonymous_resident_bytes() - releaser.baseline
time.sleep(0.8)
idle = anonymous_resident_bytes() - releaser.baseline
print(json.dumps({"kept": not kept, "busy": busy, "early": early, "idle": idle, "trims": releaser.trims}))
"""


def test_a_stub_gives_back_what_it_kept_once_idle():
    """After a burst the stub's heap returns to its size at start, but not while work keeps coming."""
    result = json.loads(subprocess.run([sys.executable, "-c", _IDLE_HEAP], check=True, capture_output=True,
                                       text=True).stdout)
    assert result["kept"] and result["busy"] > 48 * MIB and result["early"] > 48 * MIB, result
    assert result["idle"] < 16 * MIB and result["trims"] == 1, result
