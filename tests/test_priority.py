"""Who runs first when the CPU is short (vocos_triton.serving.priority): the server's processes share the
launcher's session (one scheduler group), and only the threads that compute (or start to) run at the lower
priority; the stubs' health threads, tritonserver and the guard keep the launcher's."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, List

import pytest

from vocos_triton.launcher.memory import torch_workers
from vocos_triton.launcher.watchdog import python_stubs
from vocos_triton.serving.priority import COMPUTE_NICE_ENV, MAX_NICE, compute_nice, lower_compute_priority


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _in_new_thread(work) -> Dict[str, int]:
    seen: Dict[str, int] = {}

    def run() -> None:
        work()
        seen["nice"] = _nice(threading.get_native_id())
        child = threading.Thread(target=lambda: seen.update(child=_nice(threading.get_native_id())))
        child.start()
        child.join()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen


def test_compute_nice_is_ten_below_the_launcher_within_the_kernels_range():
    assert compute_nice(0) == 10 and compute_nice(5) == 15 and compute_nice(15) == MAX_NICE == 19


def test_lower_compute_priority_lowers_the_calling_thread_and_those_it_starts_only(monkeypatch):
    own = _nice(threading.get_native_id())
    if own + 3 > MAX_NICE:
        pytest.skip("this process already runs at the lowest priority")
    monkeypatch.setenv(COMPUTE_NICE_ENV, str(own + 3))
    seen = _in_new_thread(lower_compute_priority)
    assert seen == {"nice": own + 3, "child": own + 3}
    assert _nice(threading.get_native_id()) == own  # the caller's siblings keep theirs
    # a thread already lower stays there; without the variable nothing changes
    assert _in_new_thread(lambda: (os.setpriority(os.PRIO_PROCESS, 0, own + 5), lower_compute_priority())) == {
        "nice": own + 5, "child": own + 5}
    monkeypatch.delenv(COMPUTE_NICE_ENV)
    assert _in_new_thread(lower_compute_priority) == {"nice": own, "child": own}


def _threads(pid: int) -> List[int]:
    return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]


def test_the_servers_processes_share_the_launchers_session_and_only_the_computation_is_lowered(triton):
    launcher_nice = _nice(threading.get_native_id())
    computing = compute_nice(launcher_nice)
    assert computing > launcher_nice or launcher_nice == MAX_NICE
    host = triton.torch_host.process.pid
    # one session, one scheduler group (autogroup); tritonserver and the torch host each lead their own
    # process group, which stop() kills
    for pid in (triton.process.pid, triton.guard.process.pid, host):
        assert os.getsid(pid) == os.getsid(0), pid
    assert os.getpgid(triton.process.pid) == triton.process.pid and os.getpgid(host) == host
    # the guard keeps the launcher's priority, every thread of it; so does tritonserver (which sets nice
    # values of its own on some of its threads)
    assert {_nice(tid) for tid in _threads(triton.guard.process.pid)} == {launcher_nice}
    assert _nice(triton.process.pid) == launcher_nice
    stubs = list(python_stubs(triton.process.pid))
    assert len(stubs) >= 8
    for stub in stubs:
        # the health thread is the stub's first (pb_stub starts it right after the interpreter, before any
        # Python runs) and keeps the launcher's priority; model.py lowers the main thread first thing, so
        # the imports and every thread started after them (the backend's queue monitors, ours) compute
        # below it. No thread of numpy's BLAS: it would have started at the launcher's priority.
        niceness = {tid: _nice(tid) for tid in _threads(stub)}
        health = min(tid for tid in niceness if tid != stub)
        assert niceness.pop(health) == launcher_nice, (stub, health, niceness)
        assert set(niceness.values()) == {computing}, (stub, niceness)
    # the torch host and every worker it forked compute at the lower priority, all their threads
    workers = torch_workers(stubs)
    assert workers
    for pid in (host, *workers):
        assert {_nice(tid) for tid in _threads(pid)} == {computing}, pid
