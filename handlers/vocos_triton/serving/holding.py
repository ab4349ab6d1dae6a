"""Which of the gRPC guard's calls a stub holds right now: one small file per stub process.

When a stub dies, tritonserver 2.51 fails the batch it held only 1-2 s later. The launcher's watchdog
reads the dead stub's file instead, at once, and the guard sends exactly those calls again
(vocos_triton.launcher.resend). The guard numbers each call in the request parameter
:data:`~vocos_triton.contract.CALL_PARAMETER` (ensembles pass it on to their steps); a stub writes the
numbers of the batch it runs before computing it and clears them after. The launcher names the folder in
:data:`HOLDING_DIR_ENV` (a 0700 folder it removes at stop); without it nothing is written.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, List, Optional

#: the environment variable naming the folder of the holding files (set by the launcher for tritonserver)
HOLDING_DIR_ENV = "VOCOS_HOLDING_DIR"


def holding_file(directory: Path, pid: int) -> Path:
    return directory / str(pid)


class Holding:
    """This process's holding file (a no-op without :data:`HOLDING_DIR_ENV`)."""

    def __init__(self, directory: Optional[str] = None) -> None:
        directory = directory if directory is not None else os.environ.get(HOLDING_DIR_ENV)
        self.path: Optional[Path] = None
        self._fd: Optional[int] = None
        if directory:
            with contextlib.suppress(OSError):  # a folder that is gone: the stub serves all the same
                self.path = holding_file(Path(directory), os.getpid())
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def hold(self, calls: Iterable[int]) -> None:
        """The calls of the batch about to run (replacing the last batch's)."""
        if self._fd is not None:
            data = " ".join(str(call) for call in calls).encode()
            os.ftruncate(self._fd, 0)
            if data:
                os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)


def held_calls(directory: Path, pid: int, remove: bool = True) -> List[int]:
    """The calls stub ``pid`` held when it stopped (its file removed unless ``remove`` is False)."""
    path = holding_file(directory, pid)
    try:
        text = path.read_text()
    except OSError:
        return []
    if remove:
        path.unlink(missing_ok=True)
    return [int(word) for word in text.split() if word.isdigit()]
