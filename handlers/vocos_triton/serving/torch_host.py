"""The torch host: one process that imports torch once and forks a worker for each TorchScript stub.

Importing torch costs each process about 144 MB of private memory (libtorch's static initialisation,
then some 1,100 Python modules), more than a vocoder's weights; with two instances per batched model,
the CPU profile had eight stubs paying it. A child forked after the import shares those pages with its
parent and siblings until it writes to them, and the serving code barely does (``gc.freeze()`` keeps
the collector from touching them): a forked worker holding a charactr vocoder measured 67 MB private,
weights included, against about 210 MB for a stub that imports torch itself.

tritonserver starts each stub itself (it must be its child), so the stub stays: it imports numpy only,
validates, plans the batches and answers, and each forward goes over a Unix socket to its worker
(:class:`~vocos_triton.serving.runners.RemoteScript`). The launcher starts the host before tritonserver
and tells the stubs where it listens (:data:`~vocos_triton.serving.runners.TORCH_HOST_ENV`); the socket
lives in a directory only the server's user can enter (what goes over it is pickled).

A worker lives as long as its stub: it exits the moment the stub does, even mid-forward
(:func:`exit_with_stub`), or when the stub's connection closes (an unload). A worker that dies makes its
stub exit, so the watchdog replaces the instance as for any dead stub. The host never runs torch itself:
a process that forks must not have started OpenMP's threads.

    python -m vocos_triton.serving.torch_host --socket PATH
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any, Optional

import numpy as np  # noqa: F401  (imported here, shared by every worker)
import torch  # noqa: F401  (the point of the host: imported once, before any fork)

from . import kernels, torchscript  # noqa: F401  (the workers' code, imported before the fork)
from .allocator import MemoryReleaser
from .priority import lower_compute_priority
from .scripts import worker_name

log = logging.getLogger("vocos_triton.serving.torch_host")

_PR_SET_NAME = 15


def name_process(name: str) -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def peer_pid(conn: socket.socket) -> int:
    """The connecting process (the stub), from the socket's credentials."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise PermissionError(f"a process of uid {uid} connected to the torch host")
    return pid


def exit_with_stub(stub_pid: int) -> None:
    """End this worker the moment its stub exits, even mid-forward: nobody will read that forward, and on a
    saturated server what was left of it delayed the surviving instance, which was computing again the
    very calls the dead stub held. Without pidfds (Linux < 5.3) the worker ends after the forward, when it
    reads the closed connection."""
    try:
        pidfd = os.pidfd_open(stub_pid)
    except (AttributeError, OSError):  # no pidfds, or the stub is already gone (the connection tells)
        return

    def wait() -> None:
        select.select([pidfd], [], [])  # readable once the process has exited
        os._exit(0)

    threading.Thread(target=wait, name="stub-exit", daemon=True).start()


def serve_worker(channel: Connection, stub_pid: int) -> None:
    """A worker's life: load one artifact, then run its forwards until the stub goes."""
    exit_with_stub(stub_pid)
    script: Optional[torchscript.LoadedScript] = None
    releaser: Optional[MemoryReleaser] = None
    while True:
        try:
            command, payload = channel.recv()
        except (EOFError, OSError):  # the stub went: nothing is waiting for this worker any more
            return
        try:
            if command == "load":
                releaser = MemoryReleaser(payload.pop("retain_memory_mb"))
                idle_release_s = payload.pop("idle_release_s")
                script = torchscript.LoadedScript(**payload)
                releaser.release_when_idle(idle_release_s)
                reply: Any = script.info()
            elif command == "call":
                reply = script(*payload)
                releaser.after()
            elif command == "settle":
                releaser.settle()
                reply = None
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception as exc:  # the stub raises it; the worker serves on
            channel.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
            continue
        channel.send(("ok", reply))


def run_host(path: str) -> None:
    lower_compute_priority()  # the workers forked from here compute: after the stubs' health threads
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    gc.collect()
    gc.freeze()  # what the import made stays shared: the collector never writes to it again
    log.info("torch host (torch %s) listening on %s", torch.__version__, path)
    while True:
        conn, _ = listener.accept()
        try:
            stub = peer_pid(conn)
        except (OSError, PermissionError) as exc:
            log.warning("torch host: refused a connection: %s", exc)
            conn.close()
            continue
        if os.fork() == 0:  # the worker
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            name_process(worker_name(stub))
            try:
                serve_worker(Connection(conn.detach()), stub)
            finally:
                os._exit(0)
        conn.close()


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on (in a private directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_host(args.socket)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

