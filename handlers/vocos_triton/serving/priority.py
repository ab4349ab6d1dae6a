"""Which of the server's threads the kernel runs first when CPU time is short: the computation last.

tritonserver 2.51's Python backend takes a stub for dead when the stub's health thread (it wakes every
300 ms) has not run within a 1 s window, and then frees the shared memory of the batch that the living
stub is still computing on: a use-after-free that crashed the stub or tritonserver under bursts. During
a burst the gRPC guard reads a gigabyte of requests, tritonserver copies what the guard admits, and the
stubs and torch workers compute; on a shared core a health thread waited up to 1.2 s for its turn.

The launcher therefore runs every server process in one scheduler group (one session, so one autogroup:
as in a container, where all processes share one CPU cgroup) and passes ``VOCOS_COMPUTE_NICE``; a stub
lowers its main thread to that nice value as the first line of its ``model.py``, and the torch host at
its start, so that the workers it forks inherit it. The stub's health thread, which the backend starts
before any Python runs, keeps the launcher's priority, as do tritonserver and the guard: they do little
work and must do it at once. The imports after that first line are most of a stub's start (numpy and
our package; torch for the streaming stubs), and a replacement stub starting at the launcher's priority
took the core from the instance serving beside it. A niced thread loses nothing when the CPU is free; it
only yields when the others have work. See docs/architecture.md ("Who runs first").
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# the variable the launcher sets for tritonserver (its stubs inherit it) and the torch host
COMPUTE_NICE_ENV = "VOCOS_COMPUTE_NICE"
# how much lower than the launcher the computation runs: at nice +10 a thread weighs about a tenth of one
# at the launcher's (the kernel's weights go 1.25x per step)
COMPUTE_NICE_STEP = 10
MAX_NICE = 19


def compute_nice(launcher_nice: int) -> int:
    """The nice value of the computing threads of a server whose launcher runs at ``launcher_nice``."""
    return min(MAX_NICE, launcher_nice + COMPUTE_NICE_STEP)


def lower_compute_priority() -> None:
    """Lower the calling thread, and the threads it starts from now on, to ``$VOCOS_COMPUTE_NICE``.

    On Linux a nice value belongs to a thread (``setpriority(PRIO_PROCESS, 0)`` sets the caller's only)
    and a new thread inherits its creator's, so the threads started before this call keep their
    priority. Without the variable (a model loaded outside the launcher, a test) nothing changes; a
    thread already at a lower priority stays there (raising one needs privileges)."""
    value = os.environ.get(COMPUTE_NICE_ENV, "").strip()
    if not value:
        return
    target = min(MAX_NICE, int(value))
    if os.getpriority(os.PRIO_PROCESS, 0) < target:
        os.setpriority(os.PRIO_PROCESS, 0, target)
        log.debug("computing at nice %d", target)
