"""Restores a model instance whose Python-backend stub process died (tritonserver 2.51 never restarts one).

tritonserver 2.51 keeps a model READY when one of its stubs dies, and keeps sending that instance batches,
each failing after a second ("Stub process ... is not healthy"), for ever. Unloading and loading the model
repairs it but takes every instance away for seconds ("has no available versions"). The repair here
costs no availability instead: each instance is its own ``instance_group`` of count 1 with its own
``host_policy`` name (model_repository/*/config.pbtxt), so each has its own identity (tritonserver's
instance *signature*), and a load whose config override differs only in ``instance_group`` updates the
instances in place while the model serves (core ``TritonModel::UpdateInstanceGroup``): one load whose
config has the dead instance's group under a new ``host_policy`` generation (``vocos_mel_0`` ->
``vocos_mel_0.r1``). The new stub starts beside the serving ones; once it is ready the dead instance is
taken out, and the load returns when its backend thread has ended.

Why one load, not "remove, then add": tritonserver 2.51 counts the exit order it queues for a removed
instance against the model's *waiting* instances (core ``RateLimiter::EnqueuePayload`` decrements the
consumer count of the shared queue). Removing the dead instance while it still holds its batch (the
backend fails that batch only after its 1 s health poll, 1-2 s after the death) left the live instance
with no batch to take for that long: every call of the model waited (measured: 1.6 s without an answer).
Removed together with the replacement's arrival, the replacement's own place in the queue makes up for it.

The launcher's gRPC guard is told when a repair starts and ends (``notify``), with the models it concerns
(the model and the ensembles that run it): it sends again the calls the dead instance may hold
(vocos_triton.launcher.guard), so that clients see neither its failed batch nor the one it may take
before it leaves.

A model whose groups are not laid out so (an edited config) is unloaded and loaded as before.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..serving.holding import held_calls
from .memory import is_alive, process_tree, stub_identity, stub_regions

log = logging.getLogger("vocos_triton.watchdog")

#: seconds a stub of a reloaded model may take to exit with the old model before it is ended
RETIRED_GRACE_S = 20.0


def _remove_regions(regions: Dict[int, List[Path]], pid: int) -> None:
    """Unlink the /dev/shm regions recorded for a stub that is gone (the server maps them no more, or keeps
    its mapping); a killed stub never removes them itself."""
    for region in regions.pop(pid, []):
        region.unlink(missing_ok=True)


#: a model instance: (model name, instance name)
Instance = Tuple[str, str]
#: what the watchdog tells (the guard): ``(event, models, calls)``, event "repairing" (``calls``: the guard's
#: calls the dead stubs held, None when unknown) or "repaired"
Notify = Callable[[str, Sequence[str], Optional[Sequence[int]]], None]


def ensemble_users(configs: Iterable[Dict[str, Any]]) -> Dict[str, Set[str]]:
    """model -> the ensembles that run it, directly or through another ensemble, from the models' configs
    (tritonserver's JSON form)."""
    steps = {c["name"]: {s.get("model_name") for s in c.get("ensemble_scheduling", {}).get("step", [])}
             for c in configs if c.get("name")}
    users: Dict[str, Set[str]] = {}
    for ensemble, models in steps.items():
        for model in models:
            users.setdefault(model, set()).add(ensemble)
    changed = True
    while changed:  # an ensemble of ensembles: its users use the inner ensemble's models too
        changed = False
        for model, ensembles in users.items():
            more = set().union(*(users.get(e, set()) for e in ensembles)) - ensembles - {model}
            if more:
                ensembles |= more
                changed = True
    return users


class ExitWaiter:
    """Waits until one of a set of processes exits (``pidfd`` poll: the stubs are tritonserver's children,
    not ours), or a timeout passes, or :meth:`wake` is called; a plain sleep where pidfds are missing."""

    def __init__(self) -> None:
        self._fds: Dict[int, int] = {}  # pid -> pidfd
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    def watch(self, pids: Iterable[int]) -> None:
        """Watch exactly ``pids`` from now on."""
        pids = set(pids)
        for pid in list(self._fds.keys() - pids):
            os.close(self._fds.pop(pid))
        for pid in pids - self._fds.keys():
            with contextlib.suppress(OSError, AttributeError):  # gone already (the next scan sees it), or no pidfd
                self._fds[pid] = os.pidfd_open(pid)

    def wait(self, timeout_s: float) -> None:
        poller = select.poll()
        for fd in (*self._fds.values(), self._wake_read):
            poller.register(fd, select.POLLIN)
        if poller.poll(timeout_s * 1000):
            with contextlib.suppress(BlockingIOError):
                os.set_blocking(self._wake_read, False)
                os.read(self._wake_read, 64)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    def close(self) -> None:
        self.watch(())
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)


def python_stub_instances(server_pid: int) -> Dict[int, Instance]:
    """pid -> (model, instance) of every live Python-backend stub under ``server_pid`` (one read of each
    command line: the watchdog scans every 200 ms)."""
    stubs = {}
    for pid in process_tree(server_pid):
        identity = stub_identity(pid)
        if identity is not None and is_alive(pid):
            stubs[pid] = identity
    return stubs


def python_stubs(server_pid: int) -> Dict[int, str]:
    """pid -> model name of every live Python-backend stub under ``server_pid``."""
    return {pid: model for pid, (model, _) in python_stub_instances(server_pid).items()}


def replaceable_in_place(groups: List[Dict[str, Any]]) -> bool:
    """Whether each instance of a model can be replaced alone: groups of one instance, each with a
    ``host_policy`` name of its own (without it, tritonserver takes instances of equal config as
    interchangeable and may keep the dead one)."""
    policies = [g.get("host_policy", "") for g in groups]
    return bool(groups) and all(int(g.get("count", 1)) == 1 for g in groups) and all(policies) \
        and len(set(policies)) == len(policies)


def next_generation(host_policy: str) -> str:
    """``vocos_mel_0`` -> ``vocos_mel_0.r1`` -> ``vocos_mel_0.r2``: a new identity for a replaced instance."""
    base, sep, generation = host_policy.rpartition(".r")
    if sep and base and generation.isdigit():
        return f"{base}.r{int(generation) + 1}"
    return f"{host_policy}.r1"


def groups_of(groups: List[Dict[str, Any]], instances: Set[str]) -> List[Dict[str, Any]]:
    """The groups that hold any of ``instances`` (an instance is named ``<group name>_<index>``)."""
    return [g for g in groups if any(i.rpartition("_")[0] == g.get("name") for i in instances)]


def superseded(before: Dict[int, Instance], after: Dict[int, Instance]) -> Set[int]:
    """Stubs of ``before`` whose instance has a new stub in ``after`` (a model reloaded whole)."""
    new = {instance for pid, instance in after.items() if pid not in before}
    return {pid for pid, instance in before.items() if pid in after and instance in new}


class StubWatchdog(threading.Thread):
    """Restores a model whose Python-backend stub process died.

    tritonserver 2.51 never restarts a dead stub: the model stays READY and fails every request
    ("Stub process ... is not healthy") for ever. The watchdog polls the stubs' processes and, when one
    is gone, replaces that instance in place through the repository API (the server runs in explicit
    model-control mode) while the model's other instances serve; see the module docstring. A model whose
    config does not allow that is unloaded and loaded.
    """

    def __init__(self, server_pid: int, http_url: str, interval_s: float = 0.2,
                 headers: Optional[Dict[str, str]] = None, notify: Optional[Notify] = None,
                 holding_dir: Optional[Path] = None) -> None:
        super().__init__(name="stub-watchdog", daemon=True)
        self.notify = notify
        self.holding_dir = holding_dir  # the stubs' holding files (vocos_triton.serving.holding)
        self.server_pid = server_pid
        self.http_url = http_url
        self.headers = dict(headers or {})  # the admin key: the repository API is restricted
        self.interval_s = interval_s
        self.restarts: List[Tuple[str, float]] = []  # (model, seconds from noticing to loaded)
        self._stop_event = threading.Event()
        self._exits = ExitWaiter()  # a stub's death wakes the watchdog at once: the guard re-sends its calls
        self._users: Optional[Dict[str, Set[str]]] = None  # model -> ensembles that run it (read when needed)
        self._first_scan = python_stub_instances(server_pid)
        # model -> groups taken out of it whose replacement has not loaded yet (added again next round)
        self._lost_groups: Dict[str, Dict[str, Dict[str, Any]]] = {}

    def stop(self) -> None:
        self._stop_event.set()
        self._exits.wake()

    def scan(self, retired: Dict[int, float], regions: Dict[int, List[Path]]) -> Dict[int, Instance]:
        """The live stubs, less the retired ones (see :meth:`run`); forgets retired stubs that have
        exited (removing their shared memory and holding files) and ends those that outlived their grace period."""
        alive = python_stub_instances(self.server_pid)
        for pid, since in list(retired.items()):
            if pid not in alive:
                del retired[pid]
                _remove_regions(regions, pid)
                self.held([pid])
            elif time.monotonic() - since > RETIRED_GRACE_S:
                log.warning("stub %d of an unloaded model (%s) still runs %.0f s after the reload; ending it",
                            pid, alive[pid][0], RETIRED_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return {pid: model for pid, model in alive.items() if pid not in retired}

    def _repository_call(self, model: str, action: str, body: bytes = b"{}") -> None:
        request = urllib.request.Request(f"{self.http_url}/v2/repository/models/{model}/{action}", data=body,
                                         method="POST", headers={"Content-Type": "application/json", **self.headers})
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()

    def _load_with_config(self, model: str, config: Dict[str, Any]) -> None:
        self._repository_call(model, "load", json.dumps({"parameters": {"config": json.dumps(config)}}).encode())

    def _config(self, model: str) -> Dict[str, Any]:
        with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/config", timeout=10) as response:
            return json.loads(response.read())

    def _read_ensemble_users(self) -> Dict[str, Set[str]]:
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        with urllib.request.urlopen(request, timeout=10) as response:
            index = json.loads(response.read())
        ready = sorted({m["name"] for m in index if m.get("state") == "READY"})
        return ensemble_users(self._config(name) for name in ready)

    def refresh_ensembles(self) -> None:
        """Read which ensembles run which models (at the start, and after each repair: a reload may change it)."""
        try:
            self._users = self._read_ensemble_users()
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            log.warning("could not read which ensembles run which models (%s)", exc)

    def concerned(self, models: Iterable[str]) -> List[str]:
        """``models`` and the ensembles that run them: the models whose calls a dead stub may hold."""
        models = set(models)
        if models and self._users is None:
            self.refresh_ensembles()
        users = self._users or {}
        return sorted(models.union(*(users.get(m, set()) for m in models)))

    def held(self, pids: Iterable[int]) -> Optional[List[int]]:
        """The guard's calls that the stubs ``pids`` held (their holding files, removed); None when unknown."""
        if self.holding_dir is None:
            return None
        return sorted({call for pid in pids for call in held_calls(self.holding_dir, pid)})

    def _tell(self, event: str, models: Sequence[str], calls: Optional[Sequence[int]] = None) -> None:
        if self.notify is not None and models:
            try:
                self.notify(event, models, calls)
            except Exception:  # the guard restarting: it is told at the next repair
                log.exception("could not tell the guard that %s is %s", ", ".join(models), event)

    def replace_instances(self, model: str, instances: Set[str]) -> bool:
        """Replace the dead ``instances`` of ``model`` while its other instances serve (module docstring);
        False when its config does not allow it (nothing was changed)."""
        config = self._config(model)
        groups = config.get("instance_group", [])
        lost = self._lost_groups.setdefault(model, {})
        if not lost and not replaceable_in_place(groups):
            return False
        lost.update({g["name"]: g for g in groups_of(groups, instances)})
        survivors = [g for g in groups if g.get("name") not in lost]
        replacements = [dict(g, host_policy=next_generation(g["host_policy"])) for g in lost.values()]
        self._load_with_config(model, dict(config, instance_group=survivors + replacements))
        del self._lost_groups[model]
        return True

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

    def restore(self, model: str, instances: Set[str]) -> Optional[str]:
        """Restore ``model`` whose ``instances`` died: ``"replaced"`` (in place, the model served
        throughout), ``"reloaded"`` (unloaded and loaded: its other stubs retire), ``"left"`` (an operator
        unloaded it), or None when that failed now (the watchdog tries again)."""
        if model not in self._lost_groups and self.unloaded_on_purpose(model):
            log.warning("stub of model %r exited because the model was unloaded; leaving it", model)
            return "left"
        started = time.monotonic()
        names = ", ".join(sorted(instances)) or "?"
        log.warning("stub of model %r (instance %s) died; replacing it", model, names)
        try:
            how = "replaced" if self.replace_instances(model, instances) else None
            if how is None:
                self._repository_call(model, "unload")
                self._repository_call(model, "load")
                how = "reloaded"
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            log.error("could not restore model %r: %s", model, exc)
            return None
        elapsed = time.monotonic() - started
        self.restarts.append((model, elapsed))
        log.warning("model %r %s in %.1f s (instance %s)", model,
                    "repaired in place" if how == "replaced" else "reloaded", elapsed, names)
        return how

    def run(self) -> None:
        # pid -> model of every stub seen alive. A pid leaves only once its death is handled: a stub that
        # dies between two scans (its exit takes a moment to show) is still noticed. The first scan is
        # the one taken when the watchdog was made, so a stub that dies before the first round counts.
        known: Dict[int, Instance] = dict(self._first_scan)
        regions: Dict[int, List[Path]] = {}  # a stub's /dev/shm regions: a killed stub never removes them
        # pid -> when: the other instances of a model that was reloaded. They leave with the unloaded
        # model (the unload returns before they have exited), so their exit is no death to handle;
        # one still running RETIRED_GRACE_S later is ended (it would hold its memory for good).
        retired: Dict[int, float] = {}
        retry: Dict[str, Set[str]] = {}  # model -> dead instances whose restore failed: tried again next round
        self.refresh_ensembles()  # now, while the server is idle: a death is told at once
        try:
            self._watch(known, regions, retired, retry)
        finally:
            self._exits.close()

    def _watch(self, known: Dict[int, Instance], regions: Dict[int, List[Path]], retired: Dict[int, float],
               retry: Dict[str, Set[str]]) -> None:
        while True:
            self._exits.watch(known)
            self._exits.wait(self.interval_s)
            if self._stop_event.is_set() or not is_alive(self.server_pid):
                return
            try:  # one bad round (a process vanishing mid-scan) must not end the watchdog for good
                alive = self.scan(retired, regions)
                dead = {pid: instance for pid, instance in known.items() if pid not in alive}
                pending = {model: set(instances) for model, instances in retry.items()}
                for model, instance in dead.values():
                    pending.setdefault(model, set()).add(instance)
                concerned = self.concerned(pending)
                self._tell("repairing", concerned, self.held(dead))
                try:
                    outcomes = {model: self.restore(model, instances) for model, instances in sorted(pending.items())}
                finally:
                    self._tell("repaired", concerned)
                if outcomes:
                    self.refresh_ensembles()
                retry = {model: pending[model] for model, how in outcomes.items() if how is None}
                for pid in dead:
                    _remove_regions(regions, pid)
                now = time.monotonic()
                retired.update({pid: now for pid, (model, _) in alive.items() if outcomes.get(model) == "reloaded"})
                if outcomes:  # add the stubs the repairs started
                    before, alive = alive, self.scan(retired, regions)
                    # tritonserver reloads the whole model instead of updating in place when its files look
                    # changed: then an instance name runs twice, and the older stub leaves with the old model
                    retired.update({pid: now for pid in superseded(before, alive)})
                    alive = {pid: instance for pid, instance in alive.items() if pid not in retired}
                known = alive
                for pid in known.keys() - regions.keys():
                    regions[pid] = stub_regions([pid])
            except Exception:
                log.exception("watchdog round failed; trying again")
