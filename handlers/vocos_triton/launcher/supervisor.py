"""Restarts a tritonserver (or the gRPC guard in front of it) that died while serving.

tritonserver 2.51 can abort as a whole (``boost::interprocess::lock_exception``, signal 6) when a
decoupled model's stub dies in the middle of sending a response: the stub held the lock of the shared
message queue. The stub watchdog cannot help then. The supervisor notices the exit, kills what is left of
the server's process group (orphaned stubs), removes their shared-memory regions (a killed stub never
removes its own), and starts the server again on the same ports, with a new watchdog. It gives up after
``max_restarts`` crashes within ``window_s``: a server that keeps crashing needs a person.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Tuple

from .memory import group_members, stub_regions

if TYPE_CHECKING:
    from .server import TritonServer

log = logging.getLogger("vocos_triton.launcher.supervisor")

def clean_up_group(pgid: int, known_regions: Iterable[Path] = (), wait_s: float = 10.0) -> int:
    """SIGKILL what is left of a process group (a dead server's, the torch host's), wait (``wait_s`` at most)
    until it is gone, and remove its stubs' shared memory: the regions of the stubs still running, and
    ``known_regions`` (those of stubs that already exited by themselves); returns how many regions were
    removed."""
    members = group_members(pgid)
    regions = sorted(set(stub_regions(members)) | set(known_regions))
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s  # a killed stub takes a moment to release its memory and exit
    while members and group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    removed = 0
    for region in regions:
        if region.exists():
            region.unlink(missing_ok=True)
            removed += 1
    return removed


class ServerSupervisor(threading.Thread):
    """Restarts ``server`` (a started :class:`TritonServer`) when its tritonserver exits on its own."""

    def __init__(self, server: TritonServer, max_restarts: int = 5, window_s: float = 600.0,
                 interval_s: float = 0.5) -> None:
        super().__init__(name="tritonserver-supervisor", daemon=True)
        self.server = server
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.interval_s = interval_s
        self.restarts: List[Tuple[int, float]] = []  # (exit code, seconds from noticing to ready)
        self._crashes: List[float] = []
        self._crash_count = 0
        self._stop_event = threading.Event()

    @property
    def crashes(self) -> int:
        """How many times tritonserver exited on its own (whether or not it is back already)."""
        return self._crash_count

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def check_helpers(self) -> None:
        """Start again a helper process of the launcher that exited: the gRPC guard (it holds no state:
        calls in flight were lost with it) and the torch host (on its socket: running workers live on
        without it, a stub loaded meanwhile imported torch itself, the next ones fork from the new host)."""
        for what, helper, restart in (("the gRPC guard", self.server.guard, "restart"),
                                      ("the torch host", self.server.torch_host, "start")):
            if helper is None or helper.alive() or self.stopping:
                continue
            log.error("%s exited with code %s; restarting it", what, helper.process.returncode)
            try:
                getattr(helper, restart)()
            except OSError as exc:  # tried again next round
                log.error("could not restart %s: %s", what, exc)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.check_helpers()
            process = self.server.process
            if process is None or process.poll() is None:
                continue
            if self.stopping:
                return
            now = time.monotonic()
            self._crash_count += 1
            self._crashes = [t for t in self._crashes if now - t < self.window_s] + [now]
            if len(self._crashes) > self.max_restarts:
                log.error("tritonserver exited with code %s, the %d. time in %.0f s; not restarting it again",
                          process.returncode, len(self._crashes), self.window_s)
                return
            log.error("tritonserver exited unexpectedly with code %s; restarting it (see %s)", process.returncode,
                      self.server.log_file or "its output")
            removed = clean_up_group(process.pid, self.server.known_regions)
            if removed:
                log.warning("removed %d shared-memory regions its stubs left behind", removed)
            try:
                self.server.relaunch()
            except Exception as exc:  # tried again next round while the window allows
                log.error("could not restart tritonserver: %s", exc)
                continue
            self.restarts.append((process.returncode, time.monotonic() - now))
            log.warning("tritonserver restarted in %.1f s", time.monotonic() - now)
