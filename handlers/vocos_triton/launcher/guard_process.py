"""The gRPC guard (:mod:`vocos_triton.launcher.guard`) as a child process of the launcher.

Its own process, not a thread of the launcher: the guard copies every request (up to 60 s of audio each)
and must not share a GIL with whatever else the launcher's process runs (the tests' clients, a bench).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Dict, List, Optional, Sequence

from ..serving.allocator import MMAP_THRESHOLD_BYTES
from .access import Tls

#: where tritonserver's own gRPC listens when the guard is in front of it
GUARD_UPSTREAM_HOST = "127.0.0.1"
#: inference calls one model may have upstream at once (see vocos_triton.launcher.guard): what a model's
#: queue of 16 and two instances of batches of 8 hold
MAX_IN_FLIGHT = 32


#: glibc's heap policy for the guard: the requests it copies (5.8 MB for 60 s of 24 kHz audio, 11.5 MB at
#: 48 kHz) come from the heap (mmap threshold 32 MB, glibc's largest) and what a call frees stays there for
#: the next one (trim threshold 2 GB), until the guard gives it all back after each spell of calls
#: (``malloc_trim``, vocos_triton.launcher.guard). One arena for all its threads: ``malloc_trim`` gives back
#: the top of the main arena only, and gRPC's threads' own arenas kept 33 MB after a spell (8 MB with one).
#: Mapping each request on its own (a 256 KB threshold, before) made every one fault its pages in and zero
#: them: 55 % of the guard's CPU in a burst of 200 x 60 s requests (perf), time during which the stubs'
#: threads on that CPU waited up to 1.9 s to run, and tritonserver 2.51 takes a stub whose threads wait a
#: second for dead and frees the memory of the batch it is computing (docs/architecture.md, "The gRPC
#: guard"). glibc's default instead adapts, then never gives the heap back: 1.34 GB after such a burst.
GUARD_HEAP_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES), "MALLOC_TRIM_THRESHOLD_": str(2 << 30),
                          "MALLOC_ARENA_MAX": "1"}


def guard_environment() -> Dict[str, str]:
    """The launcher's environment, with :data:`GUARD_HEAP_ENVIRONMENT` for glibc (fixed thresholds also
    stop its adaptation)."""
    return dict(os.environ, **GUARD_HEAP_ENVIRONMENT)


def wait_listening(process: subprocess.Popen, accepts: Callable[[], bool], timeout_s: float, what: str,
                   poll_s: float = 0.05) -> None:
    """Wait until ``accepts()`` (a helper process of the launcher listens); OSError naming ``what`` when the
    process exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OSError(f"{what} exited with code {process.returncode} while starting")
        if accepts():
            return
        time.sleep(poll_s)
    raise OSError(f"{what} did not listen within {timeout_s:.0f} s")


class GuardProcess:
    """``python -m vocos_triton.launcher.guard`` listening on ``host:port``, forwarding to ``upstream``."""

    def __init__(self, host: str, port: int, upstream: str, tls: Optional[Tls] = None,
                 output: Optional[IO[bytes]] = None, grace_s: float = 4.0, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.host, self.port, self.upstream, self.tls, self.output = host, port, upstream, tls, output
        self.grace_s = grace_s  # what calls in flight get after SIGTERM: the launcher's exit timeout
        self.max_in_flight = max_in_flight
        self.process: Optional[subprocess.Popen] = None
        self._notify_lock = threading.Lock()

    def command(self) -> List[str]:
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        args = [sys.executable, "-m", "vocos_triton.launcher.guard", "--listen", listen, "--upstream", self.upstream,
                "--grace", f"{self.grace_s:g}", "--max-in-flight", str(self.max_in_flight)]
        if self.tls is not None:
            args += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
            if self.tls.ca is not None:
                args += ["--tls-ca", str(self.tls.ca)]
        return args

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the guard and wait until its port accepts connections."""
        self.process = subprocess.Popen(self.command(), stdout=self.output, env=guard_environment(),
                                        stderr=subprocess.STDOUT if self.output else None, stdin=subprocess.PIPE)
        os.set_blocking(self.process.stdin.fileno(), False)  # a stuck guard must not stall the watchdog
        wait_listening(self.process, self._accepts, timeout_s, f"the gRPC guard (port {self.port})")

    def _accepts(self) -> bool:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        with contextlib.suppress(OSError), socket.create_connection((host, self.port), timeout=0.5):
            return True
        return False

    def notify(self, event: str, models: Sequence[str], calls: Optional[Sequence[int]] = None) -> None:
        """Tell the guard that a stub repair of ``models`` is ``"repairing"`` (the dead stubs held ``calls``,
        None: unknown) or ``"repaired"``: the watchdog's notices; the guard sends those calls again."""
        process = self.process
        if process is None or process.stdin is None or process.poll() is not None:
            return
        notice = {"event": event, "models": list(models)}
        if calls is not None:
            notice["calls"] = list(calls)
        line = json.dumps(notice) + "\n"
        with self._notify_lock, contextlib.suppress(BlockingIOError, BrokenPipeError, ValueError):
            process.stdin.write(line.encode())
            process.stdin.flush()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Stop taking calls (SIGTERM); calls in flight get the grace period."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        """Wait for the exit, killing the guard once ``timeout_s`` has passed."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.wait(0)
        self.start()
