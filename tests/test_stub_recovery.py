"""A Python-backend stub killed mid-run: the launcher's watchdog restores the model, clients recover.

tritonserver 2.51 never restarts a dead stub by itself (see shared/triton-notes.md). This file runs
last (alphabetically) because it kills a stub of the session's server; the model is serving again
before it returns.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import List, Tuple

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from vocos_client import VocosClient
from vocos_triton.launcher import metrics
from vocos_triton.launcher.memory import stub_regions
from vocos_triton.launcher.watchdog import python_stubs

import reference_outputs as ref
from triton_helpers import make_inputs

# generous: the reload took 2.6-6 s on an idle machine and 13 s with three callers and other jobs on the
# two cores; what this test is about is that no caller loses a request meanwhile
RESTORE_WITHIN_S = 30.0


def test_killed_stub_is_restored_and_client_retries_recover(triton, reference_mel, speech_1s):
    mel = ref.mel_features(reference_mel, speech_1s)
    expected = ref.mel_decode(reference_mel, mel)
    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    raw_statuses: List[Tuple[float, str]] = []
    sdk_results: List[object] = []
    stop = threading.Event()

    def sdk_load() -> None:  # what a TTS stack does: keep synthesizing, with the SDK's default settings
        with VocosClient(triton.grpc_url) as client:
            while not stop.is_set():
                try:
                    sdk_results.append(client.synthesize(mel=mel))
                except Exception as exc:  # recorded and asserted on below
                    sdk_results.append(exc)

    def stubs() -> List[int]:
        return [pid for pid, model in python_stubs(triton.process.pid).items() if model == "vocos_mel"]

    # the model runs two instances; one of them dies
    stub_pids = stubs()
    assert len(stub_pids) == 2, stub_pids
    stub_pid = stub_pids[0]
    (region,) = stub_regions([stub_pid])
    # under load: several callers at once; default settings retry within the call's deadline (60 s),
    # not a count, so none of them loses a request while the model reloads
    workers = [threading.Thread(target=sdk_load) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    os.kill(stub_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    restored_after = None
    while time.monotonic() - killed_at < 60:  # restored: reloaded by the watchdog, and answering
        try:
            raw.infer("vocos_mel", make_inputs({"mel": mel}), client_timeout=10)
            if triton.watchdog is not None and triton.watchdog.restarts:
                restored_after = time.monotonic() - killed_at
                break
        except InferenceServerException as exc:
            raw_statuses.append((time.monotonic() - killed_at, exc.status()))
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join(timeout=120)

    # (plain requests right after the kill fail when they reach the dead instance, unless the live one
    # took them all; the SDK's retries hide both)
    assert restored_after is not None and restored_after <= RESTORE_WITHIN_S, (restored_after, raw_statuses)
    # the reload starts new instances, then ends the surviving old one
    restored = metrics.settled(stubs, lambda pids: len(pids) == 2 and not set(stub_pids) & set(pids), timeout_s=30)
    assert len(restored) == 2 and not set(stub_pids) & set(restored), (stub_pids, restored)
    assert triton.watchdog is not None and [m for m, _ in triton.watchdog.restarts] == ["vocos_mel"]
    assert not region.exists()  # the killed stub's shared memory is removed, not leaked
    errors = [r for r in sdk_results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of {len(sdk_results)} calls failed: {errors[:3]}"
    assert len(sdk_results) >= 6
    for waveform in sdk_results:
        assert ref.max_error(waveform, expected) <= 1e-4
    # the ensembles that use the model work again too
    result = raw.infer("resynthesize_mel", make_inputs({"audio": speech_1s}), client_timeout=60)
    assert ref.max_error(result.as_numpy("waveform")[0], ref.mel_resynthesize(reference_mel, speech_1s)) <= 1e-4
    assert np.isfinite(result.as_numpy("waveform")).all()
    raw.close()


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
