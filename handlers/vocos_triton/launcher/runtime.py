"""The Python environment that the Python-backend stubs embed (the serving runtime).

Building the repository needs the reference packages (``vocos``, ``encodec``, hence ``torchaudio``,
hence the pinned torch 2.11 CUDA build). Serving needs only torch to load TorchScript, and every
stub process pays for its torch import, a CUDA build much more private memory than a CPU-only one.
Five stubs make that the bulk of the server's memory (docs/performance.md, "Serving runtime"). So
the CPU profile serves from a separate, lean environment (``make runtime``: CPU torch + numpy + this
package); the GPU profile needs a CUDA build there.

The stub embeds the first ``python3`` on ``PATH`` (see ``../shared/triton-notes.md``), so choosing the
runtime means putting its ``bin`` first on the server's ``PATH``; it must be the Python version of
the stub binary we pick from the nvidia-pytriton wheel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

#: set by the Makefile to the runtime environment's python; unset, the stubs use the current one
RUNTIME_PYTHON_ENV = "VOCOS_RUNTIME_PYTHON"

_PROBE = """
import json, sys
import torch
import vocos_triton.serving.models  # what every model.py imports
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "torch": torch.__version__,
                  "cuda": torch.version.cuda, "prefix": sys.prefix}))
"""


class UnusableRuntime(RuntimeError):
    """The runtime environment cannot serve (its python is missing, or cannot import torch and our package)."""


@dataclass(frozen=True)
class Runtime:
    """A probed serving runtime: its interpreter and what it imports."""

    python: Path
    python_version: str  # "3.11"
    torch_version: str
    cuda: Optional[str]  # torch.version.cuda; None for a CPU-only build
    prefix: Path

    @property
    def bin_dir(self) -> Path:
        return self.python.parent

    def describe(self) -> str:
        build = f"CUDA {self.cuda}" if self.cuda else "CPU-only"
        return f"torch {self.torch_version} ({build}), Python {self.python_version}, {self.prefix}"


def default_runtime_python() -> Path:
    """``$VOCOS_RUNTIME_PYTHON`` if set, else the interpreter running this code."""
    configured = os.environ.get(RUNTIME_PYTHON_ENV, "").strip()
    return Path(configured) if configured else Path(sys.executable)


def runtime_environment() -> Dict[str, str]:
    """This process's environment without ``PYTHONPATH``, to run the runtime's python as a stub runs: the
    stub ignores ``PYTHONPATH``, and ours may point at another interpreter's packages."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def probe(python: Path, timeout_s: float = 120.0) -> Runtime:
    """Import what the stubs import, in ``python``, and report its versions; raise if it cannot serve.

    The path is used as given, not resolved: a virtual environment's ``bin/python`` is a symlink to
    the base interpreter, and only the venv path makes the venv's site-packages importable.
    """
    if not python.exists():
        raise UnusableRuntime(f"runtime python {python} does not exist; build it with `make runtime` "
                              f"or point {RUNTIME_PYTHON_ENV} / --runtime-python at an environment with torch")
    result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s,
                            env=runtime_environment())
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise UnusableRuntime(f"runtime python {python} cannot import torch and vocos_triton ({tail[0]}); "
                              "install them there (`make runtime` builds the default runtime)")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return Runtime(python=python, python_version=info["python"], torch_version=info["torch"], cuda=info["cuda"],
                   prefix=Path(info["prefix"]))
