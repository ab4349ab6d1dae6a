"""A Python-backend stub killed mid-run: the launcher's watchdog replaces it, clients hardly notice.

tritonserver 2.51 never restarts a dead stub by itself (see shared/triton-notes.md). This file runs
last (alphabetically) because it kills a stub of the session's server; the model is serving again
before it returns.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, List, Tuple

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from vocos_client import VocosClient
from vocos_triton.launcher import metrics
from vocos_triton.launcher.memory import stub_regions
from vocos_triton.launcher.watchdog import python_stub_instances, python_stubs

import reference_outputs as ref
from triton_helpers import make_inputs

# generous: the reload took 2.6-6 s on an idle machine and 13 s with three callers and other jobs on the
# two cores; what this test is about is that no caller loses a request meanwhile
RESTORE_WITHIN_S = 30.0


def test_killed_stub_is_replaced_while_the_other_instance_serves(triton, reference_mel, speech_1s):
    """One of vocos_mel's two stubs is SIGKILLed under load from plain tritonclient callers (no retries).
    The watchdog starts a replacement beside the live instance and takes the dead one out (an in-place
    instance update): the model never stops answering. The guard sends again the calls the dead stub held
    (its holding file) and any that tritonserver routed to it before it left: no call fails, and every
    answer is the reference's audio."""
    mel = ref.mel_features(reference_mel, speech_1s)
    expected = ref.mel_decode(reference_mel, mel)
    outcomes: List[Tuple[float, str]] = []  # (seconds since the kill, "ok" or the status)
    stop = threading.Event()
    callers = 3
    killed_at = [float("inf")]

    def plain_load() -> None:  # a TTS stack with its own client and no retries
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                result = client.infer("vocos_mel", make_inputs({"mel": mel}), client_timeout=30)
                status = "ok" if ref.max_error(result.as_numpy("waveform")[0], expected) <= 1e-4 else "wrong audio"
            except InferenceServerException as exc:
                status = f"{exc.status()}: {exc.message()}"
            outcomes.append((sent - killed_at[0], status))
        client.close()

    def stubs() -> Dict[int, str]:
        return {pid: instance for pid, (model, instance) in python_stub_instances(triton.process.pid).items()
                if model == "vocos_mel"}

    before = stubs()
    assert len(before) == 2, before
    victim, survivor = sorted(before)
    (region,) = stub_regions([victim])
    repairs_before = len(triton.watchdog.restarts)
    workers = [threading.Thread(target=plain_load) for _ in range(callers)]
    for worker in workers:
        worker.start()
    time.sleep(2.0)
    killed_at[0] = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    repaired = metrics.settled(lambda: triton.watchdog.restarts[repairs_before:], bool, timeout_s=RESTORE_WITHIN_S)
    time.sleep(2.0)  # calls after the repair
    stop.set()
    for worker in workers:
        worker.join(timeout=60)

    after = metrics.settled(stubs, lambda now: len(now) == 2, timeout_s=30)
    assert [m for m, _ in repaired] == ["vocos_mel"], _recovery_report(triton, repaired)
    # the live instance served throughout; the dead one was replaced under its own instance name
    assert survivor in after and victim not in after and sorted(after.values()) == sorted(before.values())
    assert not region.exists()  # the killed stub's shared memory is removed, not leaked
    failed = [(round(t, 2), status) for t, status in outcomes if status != "ok"]
    assert len(outcomes) >= 20 and not failed, failed
    # the ensembles that use the model answer too
    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    result = raw.infer("resynthesize_mel", make_inputs({"audio": speech_1s}), client_timeout=60)
    assert ref.max_error(result.as_numpy("waveform")[0], ref.mel_resynthesize(reference_mel, speech_1s)) <= 1e-4
    raw.close()
    with VocosClient(triton.grpc_url) as client:  # and the SDK
        assert ref.max_error(client.synthesize(mel=mel), expected) <= 1e-4


def _recovery_report(triton, restored) -> str:
    """What a failed restore leaves to read: the watchdog's and supervisor's state, the server log's end."""
    watchdog, supervisor = triton.watchdog, triton.supervisor
    log_tail = triton.log_file.read_text(errors="replace").splitlines()[-40:] if triton.log_file else []
    return "\n".join([f"restored after {restored}; watchdog alive: {watchdog is not None and watchdog.is_alive()}, "
                      f"model reloads: {watchdog.restarts if watchdog else None}, server restarts: "
                      f"{supervisor.restarts if supervisor else None}", *log_tail])


def test_killed_streaming_stub_ends_open_streams_and_is_restored(triton, reference_mel, monkeypatch):
    """tritonserver 2.51 never answers the open requests of a stub that died: the SDK's stream gives up
    after its stall timeout with ServerUnavailableError (never a hang); the watchdog restores the model
    and a new stream is exact again. (Killed while sending a piece, the stub can take tritonserver down
    with it, a lock_exception abort; the supervisor then restarts the server: the same outcome, later.)"""
    from vocos_client import ServerUnavailableError, _stream
    from vocos_triton.contract import Model
    from vocos_triton.speech import speech_clip

    monkeypatch.setattr(_stream, "STALL_TIMEOUT_S", 5.0)
    mel = ref.mel_features(reference_mel, speech_clip(30 * 24_000, seed=9))
    offline = ref.mel_decode(reference_mel, mel)
    (stub_pid,) = [pid for pid, m in python_stubs(triton.process.pid).items() if m == Model.VOCOS_MEL_STREAM]
    with VocosClient(triton.grpc_url, timeout=120) as client:
        pieces = client.stream(mel=mel)
        next(pieces)  # the stream is open and computing
        os.kill(stub_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # the stall timeout, or the reload's "no available versions" if Triton answers first
        with pytest.raises(ServerUnavailableError):
            for _ in pieces:
                pass
        ended_after = time.monotonic() - killed_at
        restored = None
        while restored is None and time.monotonic() - killed_at < 60:
            try:
                audio = np.concatenate(list(client.stream(mel=mel, chunk_frames=500)))
                restored = time.monotonic() - killed_at
            except ServerUnavailableError:
                time.sleep(0.25)
    assert ended_after <= 5.0 + RESTORE_WITHIN_S, ended_after
    assert restored is not None and restored <= 3 * RESTORE_WITHIN_S, _recovery_report(triton, restored)
    assert ref.max_error(audio, offline) <= 1e-4


@pytest.mark.ends_session_server
def test_crashed_tritonserver_is_restarted_on_the_same_ports(triton, reference_mel, speech_1s):
    """Last: tritonserver itself dies (as 2.51 does when a decoupled stub dies holding a queue lock): the
    supervisor removes what its stubs left in /dev/shm, starts it again on the same ports with a new
    watchdog, and a client's retries carry its call across the restart."""
    from vocos_triton.launcher.memory import group_members, stub_regions

    mel = ref.mel_features(reference_mel, speech_1s)
    old_pid = triton.process.pid
    regions = stub_regions(group_members(old_pid))
    assert regions and all(r.exists() for r in regions)
    restarts_before = len(triton.supervisor.restarts)
    os.kill(old_pid, signal.SIGKILL)  # the server only: its stubs are orphaned, as after an abort
    with VocosClient(triton.grpc_url, timeout=120) as client:
        waveform = client.synthesize(mel=mel)  # retried until the restarted server answers
    assert ref.max_error(waveform, ref.mel_decode(reference_mel, mel)) <= 1e-4, _recovery_report(triton, None)
    assert len(triton.supervisor.restarts) == restarts_before + 1 and triton.process.pid != old_pid
    assert not group_members(old_pid) and not any(r.exists() for r in regions)
    watchdog = triton.watchdog
    assert watchdog is not None and watchdog.is_alive() and watchdog.server_pid == triton.process.pid


@pytest.mark.ends_session_server
def test_stopping_a_dead_server_leaves_no_orphaned_stubs(triton):
    """Very last (it stops the session's server): when tritonserver died and nobody restarts it, stop()
    still ends its orphaned stubs and removes their shared memory (they would hold ~1 GB and CPU)."""
    from vocos_triton.launcher.memory import group_members, stub_regions

    pid = triton.process.pid
    triton.supervisor.stop()  # nobody restarts it: as with --no-restart, or after too many crashes
    regions = stub_regions(group_members(pid))
    os.kill(pid, signal.SIGKILL)
    triton.process.wait()
    triton.stop()  # (the orphaned stubs may have noticed and exited by now, leaving their regions)
    assert not group_members(pid) and regions and not any(r.exists() for r in regions)
