"""Where a stub's TorchScript artifact runs: in a worker of the torch host, or in the stub itself.

Importing this module imports no torch. :func:`open_script` returns something called with numpy arrays
(the artifact's forward arguments) that returns numpy:

- :class:`RemoteScript` when the launcher started a torch host (:mod:`.torch_host`; its socket in
  :data:`TORCH_HOST_ENV`) and the instance is a CPU one: the stub then carries no torch;
- otherwise :class:`~vocos_triton.serving.torchscript.LoadedScript` in the stub's own process (a GPU
  instance, a server started without the host, a host that cannot be reached: said in the log).
"""
from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .base import server_log

#: the environment variable that tells the stubs where the torch host listens (set by the launcher)
TORCH_HOST_ENV = "VOCOS_TORCH_HOST"


def worker_name(stub_pid: int) -> str:
    """The name (``/proc/<pid>/comm``, 15 characters at most) of the torch worker of stub ``stub_pid``: memory
    accounting counts a worker with its stub (:func:`vocos_triton.launcher.memory.torch_workers`)."""
    return f"vw-{stub_pid}"[:15]


def kernel_measure_key(name: str) -> str:
    """Under which key a stub's Linear-kernel measurement is shared (:func:`.kernels.measure_once`): the
    instances of a model are stubs of the same tritonserver (their parent), and one measures for all."""
    return f"{os.getppid()}-{name}"


class WorkerLost(RuntimeError):
    """The stub's worker is gone: the stub cannot compute any more and should be replaced."""


class RemoteScript:
    """The artifact loaded by a worker the torch host forked for this stub; one call at a time (a stub
    executes one batch at a time)."""

    def __init__(self, path: str, **load: Any) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        self.channel = Connection(sock.detach())
        self._info: Dict[str, Any] = self._ask("load", load)

    def _ask(self, command: str, payload: Any) -> Any:
        try:
            self.channel.send((command, payload))
            status, reply = self.channel.recv()
        except (EOFError, OSError) as exc:
            raise WorkerLost(f"the torch worker of this stub is gone ({type(exc).__name__})") from exc
        if status != "ok":
            raise RuntimeError(reply)
        return reply

    def info(self) -> Dict[str, Any]:
        """``description``, ``geometry`` (the artifact's ``geometry()``, {} without one), ``pid`` (the
        worker's), ``kernel`` and ``kernel_log`` (the Linear kernel chosen, None where there was nothing to
        choose)."""
        return self._info

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self._ask("call", arrays)

    def settle(self) -> None:
        """The worker takes its heap now as the size it returns to (after the warm-up)."""
        self._ask("settle", None)

    def close(self) -> None:
        self.channel.close()


def open_script(args: Dict[str, str], version_dir: str, name: str, threads: int,
                kernel_probe: Optional[Sequence[np.ndarray]], retain_memory_mb: float, idle_release_s: float,
                pb: Any) -> Any:
    """``<version_dir>/model.pt`` where it should run (see the module's docstring). ``kernel_probe``: the
    forward arguments to time the Linear kernels on (None: nothing to choose)."""
    load = dict(args=args, version_dir=version_dir, threads=threads, name=name, kernel_probe=kernel_probe,
                measure_key=kernel_measure_key(name))
    path = os.environ.get(TORCH_HOST_ENV, "")
    if path and args.get("model_instance_kind") != "GPU":
        try:
            return RemoteScript(path, retain_memory_mb=retain_memory_mb, idle_release_s=idle_release_s, **load)
        except OSError as exc:  # no host (stopped, crashed): serve anyway, at the memory cost of torch here
            server_log(pb, f"{name}: the torch host ({path}) cannot be reached ({exc}); loading torch in this "
                           "stub", warning=True)
    from .torchscript import LoadedScript  # torch, imported only on this path

    return LoadedScript(**load)
