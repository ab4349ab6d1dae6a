"""The torch host's workers (vocos_triton.serving.torch_host), with a real host and a real stub's client.

A worker computes for one stub. When the stub dies (the watchdog then starts a replacement), the forward
in progress has nobody to answer; finishing it took the core from the surviving instance, which was
computing again the very calls the dead stub held."""
from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from vocos_triton.contract import Model
from vocos_triton.launcher.runtime import default_runtime_python, runtime_environment
from vocos_triton.launcher.torch_host_process import TorchHostProcess

#: a stub's side of a worker, run in the serving runtime: one 60 s forward timed, then another, during which
#: the test kills it (argv: socket, version folder)
STUB = """
import sys, time
import numpy as np
from vocos_triton.serving.scripts import RemoteScript
script = RemoteScript(sys.argv[1], retain_memory_mb=-1, idle_release_s=-1, args={}, version_dir=sys.argv[2],
                      threads=1, name="vocos_mel", kernel_probe=None, measure_key="test-torch-host")
frames = 5625  # 60 s at 24 kHz
forward = (np.zeros((1, 100, frames), np.float32), np.array([frames]), np.zeros(1, np.int64))
started = time.monotonic()
script(*forward)
print(script.info()["pid"], time.monotonic() - started, flush=True)
script(*forward)
"""


@pytest.fixture
def host() -> Iterator[TorchHostProcess]:
    host = TorchHostProcess(default_runtime_python(), runtime_environment())
    host.start()
    yield host
    host.stop()


def test_a_worker_ends_the_moment_its_stub_dies_even_mid_forward(host: TorchHostProcess, repository: Path):
    stub = subprocess.Popen([str(default_runtime_python()), "-c", STUB, str(host.socket_path),
                             str(repository / Model.VOCOS_MEL / "1")], stdout=subprocess.PIPE, text=True,
                            env=runtime_environment())
    try:
        worker, forward_s = stub.stdout.readline().split()
        worker_pid, forward_s = int(worker), float(forward_s)
        watch = os.pidfd_open(worker_pid)
        time.sleep(forward_s / 4)  # the second forward is under way
        assert stub.poll() is None and Path(f"/proc/{worker_pid}").exists()
        stub.kill()
        killed = time.monotonic()
        ended, _, _ = select.select([watch], [], [], forward_s)
        gone_after = time.monotonic() - killed
        os.close(watch)
    finally:
        stub.kill()
        stub.wait()
    assert ended, f"the worker outlived its stub by {forward_s:.1f} s, a whole forward"
    # it did not finish the forward (three quarters of it were left) before it ended
    assert gone_after < forward_s / 2, (gone_after, forward_s)
    assert host.alive()  # the host forks on for the other stubs
