"""Which CPU kernel the vocoders' Linear layers run: chosen by measurement when a model loads.

The fastest of the :data:`~vocos_triton.modules.vocoder.LINEAR_KERNELS` depends on the CPU and on the
torch build (docs/hardware.md): with AVX-512 the fused oneDNN matmul is the fastest; on an AVX2-only
CPU, oneDNN 3.12 (torch 2.13, the CPU serving runtime) picks ``brg_matmul:avx2`` for it, slower than
torch 2.11's ``gemm:jit:f32``, and close to MKL's sgemm behind ``F.linear`` (ahead or behind by CPU).
Neither the export machine nor the build environment's torch says which one the serving machine
prefers, so each vocoder stub times both on its
own CPU, with its own torch, when it loads (a few forwards of a few seconds of audio, alternating the
kernels so that noise from other processes hits both alike), keeps the faster and logs the times.
A model's instances are stubs of one server that load together: they measure one at a time, under a
lock shared by the machine's stubs (fewer forwards compete for the cores while one is timed), and the
first instance of a model to measure records its choice for the others (``how`` = "shared").

``VOCOS_LINEAR_KERNEL=onednn|aten`` forces a kernel (``auto``, the default, measures);
``VOCOS_LINEAR_KERNEL=vocos_mel=onednn,vocos_encodec=aten`` forces one per model (e.g. the choices a
server logged, to run another with the same arithmetic).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..modules.vocoder import LINEAR_KERNELS, ONEDNN, check_linear_kernel, onednn_available

log = logging.getLogger("vocos_triton.serving.kernels")

KERNEL_ENV = "VOCOS_LINEAR_KERNEL"
AUTO = "auto"
#: the stub log line that records a choice: ``LOG_PREFIX <model> {json of KernelChoice}``
LOG_PREFIX = "linear kernel:"
#: a kernel other than the default must win by this much (timer noise must not flip the choice back and forth)
MARGIN = 0.03


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a vocoder runs, and why: ``how`` is "measured", "shared" (measured by another instance of
    the model), "forced" (environment) or "only"."""

    kernel: str
    how: str
    #: best seconds per forward of the probe input, per kernel ("measured" and "shared")
    seconds: Dict[str, float]
    torch: str = torch.__version__

    def describe(self) -> str:
        times = ", ".join(f"{k} {1000 * s:.1f} ms" for k, s in sorted(self.seconds.items()))
        return f"{self.kernel} ({self.how}{': ' + times if times else ''}; torch {self.torch})"

    def log_line(self, model: str) -> str:
        return f"{LOG_PREFIX} {model} {json.dumps(asdict(self), sort_keys=True)}"


def parse_log(text: str) -> Dict[str, KernelChoice]:
    """The choices recorded in a server log, by model (the last one per model wins).

    tritonserver quotes what a stub logs as a JSON string (``"linear kernel: m {\\"how\\": ...}"``);
    a plain log (``logging``) has the payload as is."""
    choices = {}
    for line in text.splitlines():
        if LOG_PREFIX in line:
            model, _, payload = line.split(LOG_PREFIX, 1)[1].strip().partition(" ")
            if payload.endswith('"'):  # the tail of a quoted message
                payload = json.loads('"' + payload)
            choices[model] = KernelChoice(**json.loads(payload))
    return choices


def requested_kernel(env: Optional[Dict[str, str]] = None, model: Optional[str] = None) -> str:
    """What ``$VOCOS_LINEAR_KERNEL`` asks of ``model`` (validated): one kernel for every model
    (``aten``), or one per model (``vocos_mel=onednn,vocos_encodec=aten``; a model not named measures);
    ``auto`` when unset."""
    value = (os.environ if env is None else env).get(KERNEL_ENV, AUTO).strip().lower() or AUTO
    if "=" not in value:
        return value if value == AUTO else check_linear_kernel(value)
    per_model = {}
    for entry in value.split(","):
        name, _, kernel = entry.partition("=")
        if not name.strip() or not kernel.strip():
            raise ValueError(f"{KERNEL_ENV}: expected <model>=<kernel>[,...], got {entry!r}")
        per_model[name.strip()] = kernel.strip()
    kernel = per_model.get(model or "", AUTO)
    return kernel if kernel == AUTO else check_linear_kernel(kernel)


def switchable(module: torch.jit.ScriptModule) -> bool:
    """Whether ``module`` is a vocoder with switchable Linear kernels (the int8 vocoders are not)."""
    return hasattr(module, "set_linear_kernel")


def time_kernels(module: torch.jit.ScriptModule, args: Sequence[torch.Tensor], kernels: Sequence[str],
                 rounds: int = 3) -> Dict[str, List[float]]:
    """Seconds per forward of ``module(*args)`` with each kernel, alternating the kernels round by round
    after one untimed warm-up forward each (oneDNN creates its primitives on the first call)."""
    times: Dict[str, List[float]] = {k: [] for k in kernels}
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            for kernel in kernels:
                module.set_linear_kernel(kernel)
                started = time.perf_counter()
                module(*args)
                if round_index:
                    times[kernel].append(time.perf_counter() - started)
    return times


def choose_linear_kernel(module: torch.jit.ScriptModule, args: Sequence[torch.Tensor], rounds: int = 3,
                         env: Optional[Dict[str, str]] = None, model: Optional[str] = None) -> KernelChoice:
    """Set ``module``'s Linear kernel: the one forced for ``model``, else the faster on ``args`` (best of
    ``rounds``)."""
    args = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]  # a probe built without torch
    requested = requested_kernel(env, model)
    if requested != AUTO:
        module.set_linear_kernel(requested)
        return KernelChoice(requested, "forced", {})
    available = [k for k in LINEAR_KERNELS if k != ONEDNN or onednn_available()]
    if len(available) == 1:
        module.set_linear_kernel(available[0])
        return KernelChoice(available[0], "only", {})
    best = {k: min(v) for k, v in time_kernels(module, args, available, rounds).items()}
    default = ONEDNN  # the export's default, kept unless clearly beaten
    fastest = min(best, key=best.__getitem__)
    kernel = fastest if best[fastest] < best[default] * (1 - MARGIN) else default
    module.set_linear_kernel(kernel)
    return KernelChoice(kernel, "measured", best)


def choice_directory() -> Path:
    """Where the stubs of this machine (and user) serialize their measurements and share their choices."""
    return Path(tempfile.gettempdir()) / f"vocos-triton-kernels-{os.getuid()}"


def measure_once(key: str, measure: Callable[[], KernelChoice], directory: Optional[Path] = None) -> KernelChoice:
    """``measure()`` under a lock that the stubs of the machine share, once per ``key``: a later caller
    with the same key (another instance of the same model, in the same server) gets the recorded choice,
    marked "shared". Forced and only choices are not recorded (they cost nothing)."""
    directory = directory or choice_directory()
    record = directory / f"{key}.json"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        lock = open(directory / "measure.lock", "w")
    except OSError:  # no writable temporary directory (a read-only filesystem): measure alone
        return measure()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        _forget_dead_servers(directory)
        try:
            return replace(KernelChoice(**json.loads(record.read_text())), how="shared")
        except (OSError, ValueError, TypeError):
            pass  # nothing recorded (or unreadable): measure
        choice = measure()
        if choice.how == "measured":
            record.write_text(json.dumps(asdict(choice)))
        return choice


def _forget_dead_servers(directory: Path) -> None:
    """Remove the choices recorded by stubs of servers that are gone (keys start with the server's pid)."""
    for record in directory.glob("*-*.json"):
        pid = record.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            record.unlink(missing_ok=True)
