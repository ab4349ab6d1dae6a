"""Giving freed memory back to the OS after large forwards: when it trims and when it does not."""
from __future__ import annotations

from vocos_triton.allocator import MemoryReleaser


def test_trims_only_after_large_work_and_at_most_once_per_interval():
    releaser = MemoryReleaser(threshold_frames=1500, min_interval_s=60.0)
    assert releaser._trim is not None, "glibc's malloc_trim must be found on Linux"
    assert not releaser.after(1499)
    assert releaser.after(1500)
    assert not releaser.after(10_000), "a second trim within the interval is skipped"
    assert releaser.trims == 1


def test_zero_threshold_never_trims():
    releaser = MemoryReleaser(threshold_frames=0)
    assert not releaser.after(1_000_000) and releaser.trims == 0


def test_trims_again_after_the_interval():
    releaser = MemoryReleaser(threshold_frames=1, min_interval_s=0.0)
    assert releaser.after(1) and releaser.after(1) and releaser.trims == 2
