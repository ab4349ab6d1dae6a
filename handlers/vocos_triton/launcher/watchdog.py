"""Restores a model whose Python-backend stub process died (tritonserver 2.51 never restarts one)."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from .memory import process_tree, stub_model, stub_regions

log = logging.getLogger("vocos_triton.watchdog")

#: seconds a stub of a reloaded model may take to exit with the old model before it is ended
RETIRED_GRACE_S = 20.0


def _is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (tritonserver does not reap dead stubs)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _remove_regions(regions: Dict[int, List[Path]], pid: int) -> None:
    """Unlink the /dev/shm regions recorded for a stub that is gone (the server maps them no more, or keeps
    its mapping); a killed stub never removes them itself."""
    for region in regions.pop(pid, []):
        region.unlink(missing_ok=True)


def python_stubs(server_pid: int) -> Dict[int, str]:
    """pid -> model name of every live Python-backend stub under ``server_pid``."""
    stubs = {}
    for pid in process_tree(server_pid):
        model = stub_model(pid)
        if model is not None and _is_running(pid):
            stubs[pid] = model
    return stubs


class StubWatchdog(threading.Thread):
    """Restores a model whose Python-backend stub process died.

    tritonserver 2.51 never restarts a dead stub: the model stays READY and fails every request
    ("Stub process ... is not healthy") for ever. The watchdog polls the stubs' processes and, when one
    is gone, unloads and loads its model through the repository API (the server runs in explicit
    model-control mode), which starts a new stub in a few seconds. Meanwhile requests fail in ways the
    client SDK retries.
    """

    def __init__(self, server_pid: int, http_url: str, interval_s: float = 0.5,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(name="stub-watchdog", daemon=True)
        self.server_pid = server_pid
        self.http_url = http_url
        self.headers = dict(headers or {})  # the admin key: the repository API is restricted
        self.interval_s = interval_s
        self.restarts: List[Tuple[str, float]] = []  # (model, seconds from noticing to loaded)
        self._stop_event = threading.Event()
        self._first_scan = python_stubs(server_pid)

    def stop(self) -> None:
        self._stop_event.set()

    def scan(self, retired: Dict[int, float], regions: Dict[int, List[Path]]) -> Dict[int, str]:
        """The live stubs, less the retired ones (see :meth:`run`); forgets retired stubs that have
        exited (removing their shared memory) and ends those that outlived their grace period."""
        alive = python_stubs(self.server_pid)
        for pid, since in list(retired.items()):
            if pid not in alive:
                del retired[pid]
                _remove_regions(regions, pid)
            elif time.monotonic() - since > RETIRED_GRACE_S:
                log.warning("stub %d of an unloaded model (%s) still runs %.0f s after the reload; ending it",
                            pid, alive[pid], RETIRED_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return {pid: model for pid, model in alive.items() if pid not in retired}

    def _repository_call(self, model: str, action: str) -> None:
        request = urllib.request.Request(f"{self.http_url}/v2/repository/models/{model}/{action}", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json", **self.headers})
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()

    def unloaded_on_purpose(self, model: str) -> bool:
        """Whether tritonserver says ``model`` is not ready: an operator unloaded it (its stub exits too,
        and must stay gone). A model whose stub died is still READY (2.51 does not notice). Only the
        server's own answer counts: a timeout or a refused connection under load is no answer, and the
        stub is then taken as dead, so a transient error never leaves a model broken."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/ready", timeout=10):
                return False
        except urllib.error.HTTPError:  # answered, and not 200: not ready
            return True
        except (urllib.error.URLError, OSError) as exc:
            log.warning("could not ask whether %r is ready (%s); taking its stub as dead", model, exc)
            return False

    def restore(self, model: str) -> bool:
        """Reload ``model``; False when it could not be reloaded now (the watchdog tries again)."""
        if self.unloaded_on_purpose(model):
            log.warning("stub of model %r exited because the model was unloaded; leaving it", model)
            return True
        started = time.monotonic()
        log.warning("stub of model %r died; reloading it", model)
        try:
            self._repository_call(model, "unload")
            self._repository_call(model, "load")
        except (urllib.error.URLError, OSError) as exc:
            log.error("could not reload model %r: %s", model, exc)
            return False
        elapsed = time.monotonic() - started
        self.restarts.append((model, elapsed))
        log.warning("model %r reloaded in %.1f s", model, elapsed)
        return True

    def run(self) -> None:
        # pid -> model of every stub seen alive. A pid leaves only once its death is handled: a stub that
        # dies between two scans (its exit takes a moment to show) is still noticed. The first scan is
        # the one taken when the watchdog was made, so a stub that dies before the first round counts.
        known: Dict[int, str] = dict(self._first_scan)
        regions: Dict[int, List[Path]] = {}  # a stub's /dev/shm regions: a killed stub never removes them
        # pid -> when: the other instances of a model that was reloaded. They leave with the unloaded
        # model (the unload returns before they have exited), so their exit is no death to handle;
        # one still running RETIRED_GRACE_S later is ended (it would hold its memory for good).
        retired: Dict[int, float] = {}
        retry: Set[str] = set()  # models whose reload failed: tried again on the next round
        while not self._stop_event.wait(self.interval_s):
            if not _is_running(self.server_pid):
                return
            try:  # one bad round (a process vanishing mid-scan) must not end the watchdog for good
                alive = self.scan(retired, regions)
                dead = {pid: model for pid, model in known.items() if pid not in alive}
                pending = retry | set(dead.values())
                reloaded = {model for model in sorted(pending) if self.restore(model)}
                retry = pending - reloaded
                for pid in dead:
                    _remove_regions(regions, pid)
                now = time.monotonic()
                retired.update({pid: now for pid, model in alive.items() if model in reloaded})
                if dead:  # add the stubs the reloads started
                    alive = self.scan(retired, regions)
                known = alive
                for pid in known.keys() - regions.keys():
                    regions[pid] = stub_regions([pid])
            except Exception:
                log.exception("watchdog round failed; trying again")
