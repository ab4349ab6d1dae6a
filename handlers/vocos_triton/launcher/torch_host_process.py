"""The torch host (:mod:`vocos_triton.serving.torch_host`) as a child process of the launcher.

Started with the serving runtime's Python and tritonserver's environment (the workers it forks must run
what the stubs would have run), in its own process group (stopping it ends its workers too), listening
on a socket in a directory of its own, mode 0700: only the server's user can connect, and what goes over
it is pickled.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Dict, List, Optional

from .guard_process import wait_listening
from .supervisor import clean_up_group

#: how long the host may take to import torch and listen
START_TIMEOUT_S = 120.0


class TorchHostProcess:
    """``python -m vocos_triton.serving.torch_host --socket <private dir>/host.sock``."""

    def __init__(self, python: Path, environment: Dict[str, str], output: Optional[IO[bytes]] = None) -> None:
        self.python, self.environment, self.output = python, environment, output
        self.directory = Path(tempfile.mkdtemp(prefix="vocos-torch-host-"))  # 0700, as mkdtemp makes it
        self.socket_path = self.directory / "host.sock"
        self.process: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        return [str(self.python), "-m", "vocos_triton.serving.torch_host", "--socket", str(self.socket_path)]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the host (on the same socket path when it runs again) and wait until it accepts connections."""
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(self.command(), env=self.environment, stdout=self.output,
                                        stderr=subprocess.STDOUT if self.output else None,
                                        stdin=subprocess.DEVNULL, process_group=0)  # the launcher's session
        wait_listening(self.process, self._accepts, timeout_s, "the torch host", poll_s=0.1)

    def _accepts(self) -> bool:
        if not self.socket_path.exists():
            return False
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """End the host and every worker it forked (they compute nothing once tritonserver has stopped),
        and remove its directory."""
        if self.process is not None:
            # the workers, orphaned by the host, are reaped by init: wait for that, briefly (stop is bounded)
            clean_up_group(self.process.pid, wait_s=2.0)
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
