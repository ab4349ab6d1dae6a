"""Launch the tritonserver bundled in the ``nvidia-pytriton`` wheel on our model repository.

No Docker, and site-packages stays untouched: the Python backend folder Triton wants (backend
library, ``triton_python_backend_utils.py`` and the stub for this Python version side by side) is
assembled from symlinks in a build folder. The stubs embed the first ``python3`` on ``PATH``, so the
serving runtime's ``bin`` goes first (see :mod:`vocos_triton.launcher.runtime`): ``model.py`` then imports our
package from there.

Command line (``make serve``)::

    vocos-serve [--model-repository DIR] [--host 127.0.0.1] [--grpc-port 8001] [--http-port 8000]
                [--metrics-port 8002] [--profile cpu|gpu] [--runtime-python PATH]
                [--tritonserver DIR] [--metrics-config KEY=VALUE ...]
                [--admin-key-file PATH | --no-admin-key] [--api-key-file PATH]
                [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]

``--tritonserver DIR`` (or ``$VOCOS_TRITONSERVER``) serves with an installed tritonserver instead of the
wheel's, e.g. ``/opt/tritonserver`` in NVIDIA's container image (see ``deploy/Dockerfile``). Who may do
what (admin key, API key, TLS) is explained in docs/exposure.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Dict, List, Optional, Sequence, Set

from ..contract import Access
from ..paths import DEFAULT_BUILD_DIR, DEFAULT_REPOSITORY
from ..serving.allocator import MMAP_THRESHOLD_BYTES
from ..serving.holding import HOLDING_DIR_ENV
from ..serving.priority import COMPUTE_NICE_ENV, compute_nice
from ..serving.scripts import TORCH_HOST_ENV
from .access import (
    AccessError,
    Tls,
    exposure_warnings,
    grpc_headers,
    read_key,
    read_or_create_key,
    redact,
    restriction_args,
)
from .guard_process import GUARD_UPSTREAM_HOST, MAX_IN_FLIGHT, GuardProcess
from .memory import group_members, stub_regions
from .preflight import check_repository
from .runtime import Runtime, UnusableRuntime, default_runtime_python, probe
from .supervisor import ServerSupervisor, clean_up_group
from .torch_host_process import TorchHostProcess
from .watchdog import StubWatchdog

log = logging.getLogger("vocos_triton.launcher.server")

PROFILES = {"cpu": None, "gpu": "gpu"}  # profile -> --model-config-name (configs/<name>.pbtxt)

#: a tritonserver installation to use instead of the wheel's (e.g. /opt/tritonserver in the NGC image)
TRITONSERVER_ENV = "VOCOS_TRITONSERVER"

#: tritonserver ``--metrics-config`` settings we serve with by default: ``summary_latencies`` adds
#: ``nv_inference_request_summary_us`` (p50-p99 of request latency per model and replica), which the
#: Grafana dashboard in deploy/k8s reads. (``histogram_latencies`` and its first-response histogram
#: came after 2.51, which ignores the setting: time to first audio is our own metric, see
#: vocos_triton.serving.metrics.)
DEFAULT_METRICS_CONFIG = ("summary_latencies=true",)


class LaunchError(RuntimeError):
    """The server cannot be started as asked (missing files, port in use, start-up failure)."""


@dataclass(frozen=True)
class TritonDistribution:
    """Paths inside the installed nvidia-pytriton wheel."""

    binary: Path
    library_dir: Path
    backend_files: Sequence[Path]

    @classmethod
    def find(cls, python_version: Optional[str] = None) -> TritonDistribution:
        """The wheel's files, with the stub built for ``python_version`` ("3.11"; default: this Python)."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise LaunchError("nvidia-pytriton is not installed in this environment (pip install -e '.[server]')")
        package = Path(list(spec.submodule_search_locations)[0])
        root = package / "tritonserver"
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        backend = root / "backends" / "python"
        files = [backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub]
        binary = root / "bin" / "tritonserver"
        for path in [binary, *files]:
            if not path.exists():
                raise LaunchError(f"{path}: missing from the nvidia-pytriton wheel (Python {version})")
        return cls(binary=binary, library_dir=package.parent / "nvidia_pytriton.libs", backend_files=files)

    @classmethod
    def installed(cls, root: Path) -> TritonDistribution:
        """A tritonserver installation laid out as in NVIDIA's image: ``<root>/bin/tritonserver``,
        ``<root>/lib``, and ``<root>/backends/python/`` holding the backend, its utils and the stub.

        The stub there is built for the image's Python (3.10 in 24.10-py3): the serving runtime must
        be that version (the Dockerfile makes its virtual environment with the image's python3).
        """
        root = Path(root)
        backend = root / "backends" / "python"
        files = [backend / "libtriton_python.so", backend / "triton_python_backend_utils.py",
                 backend / "triton_python_backend_stub"]
        binary = root / "bin" / "tritonserver"
        for path in [binary, *files]:
            if not path.exists():
                raise LaunchError(f"{path}: missing from the tritonserver installation {root} "
                                  f"(--tritonserver / ${TRITONSERVER_ENV})")
        return cls(binary=binary, library_dir=root / "lib", backend_files=files)

    def assemble_backends(self, build_dir: Path) -> Path:
        """``<build_dir>/backends/python/`` with the three files Triton expects side by side."""
        python_dir = build_dir / "backends" / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for source in self.backend_files:
            link = python_dir / source.name
            if link.is_symlink() or link.exists():
                if link.resolve() == source.resolve():
                    continue
                link.unlink()
            link.symlink_to(source)
        return python_dir.parent


# glibc's heap in tritonserver (the stubs and torch workers set their own thresholds when they start,
# serving/allocator.py): its gRPC frontend receives each request into fresh memory, and with glibc's
# adaptive mmap threshold, which starts at 128 KB, the first burst's 5.8 MB requests were each mapped,
# faulted in and zeroed page by page (55 % of tritonserver's CPU in `perf`, in page faults), on the
# core the guard needs to refuse that burst. Fixed where the adaptation ends anyway (32 MB), requests
# come from the heap from the first call; freed memory above 256 MB at the heap's top goes back.
TRITONSERVER_HEAP_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
                                 "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def threading_environment(env: Dict[str, str]) -> Dict[str, str]:
    """Thread settings for processes that run our modules, where ``env`` does not already choose them.

    Every stub is its own process with its own OpenMP pool, and under load several stubs compute at
    once on the same cores. Threads that busy-wait after a parallel region steal those cores from the
    other stubs: a spin makes an isolated request a little faster but costs a mixed load much more
    throughput (docs/performance.md, "OpenMP wait policy"). So idle OpenMP threads sleep at once.

    numpy's OpenBLAS runs on the calling thread only, as MKL's FFT does (serving/dfti.py): the server's
    parallelism is its instances. Its own threads would start when numpy is imported, before the stub
    lowers its computation's priority (serving/priority.py), and compute at the launcher's; starting
    them also doubled numpy's import (62 -> 122 ms of CPU), which a replacement stub pays beside the
    instances that serve.
    """
    chosen: Dict[str, str] = {}
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OPENBLAS_NUM_THREADS" not in env:
        chosen["OPENBLAS_NUM_THREADS"] = "1"
    return chosen


def default_tritonserver() -> Optional[Path]:
    """``$VOCOS_TRITONSERVER`` if set (an installation root), else ``None``: the wheel's server."""
    value = os.environ.get(TRITONSERVER_ENV, "").strip()
    return Path(value) if value else None


def metrics_setting(text: str) -> str:
    """One ``--metrics-config`` value, checked for the ``KEY=VALUE`` form tritonserver wants."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"--metrics-config: expected KEY=VALUE, got {text!r}")
    return f"{key.strip()}={value.strip()}"


def ensure_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(
                f"{what} port {port} on {host} is in use ({exc.strerror}); stop whatever holds it or choose "
                f"another port (--{what.lower()}-port, or make serve {what.upper()}_PORT=...)"
            ) from exc


_handed_out_ports: Set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now and that this process has not handed out before (for tests and
    throwaway servers). The kernel may offer a port it just offered again; a server given the same port
    for gRPC and HTTP refuses to start."""
    with _handed_out_lock:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise OSError(f"no free port on {host} that this process has not handed out already")


def precompile_models(repository: Path, python: Path) -> None:
    """Write the ``__pycache__`` of every ``<model>/<version>/model.py`` with the stubs' Python, before
    tritonserver loads them. Otherwise the stub writes it on its first import, after the load: the version
    folder then looks modified to tritonserver, and the watchdog's in-place instance update (a load whose
    config differs only in ``instance_group``) becomes a full reload of the model. A read-only repository
    (the container's) gets no cache from the stubs either, so nothing is lost where this cannot write."""
    sources = sorted(str(p) for p in repository.glob("*/[0-9]*/model.py"))
    if not sources:
        return
    result = subprocess.run([str(python), "-m", "compileall", "-q", *sources], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("could not precompile the models' model.py (%s); a stub replaced by the watchdog may then "
                    "reload its whole model", (result.stdout + result.stderr).strip()[-300:])


def random_weight_models(repository: Path) -> List[str]:
    """Models whose provenance says they were built from random weights."""
    flagged = []
    for provenance in sorted(repository.glob("*/1/provenance.json")):
        if json.loads(provenance.read_text()).get("random_weights"):
            flagged.append(provenance.parent.parent.name)
    return flagged


@dataclass
class ServerOptions:
    model_repository: Path = DEFAULT_REPOSITORY
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    profile: str = "cpu"
    build_dir: Path = DEFAULT_BUILD_DIR / "triton"
    # Stop is bounded: requests in flight get this long after SIGTERM, then whatever is left of tritonserver
    # and its stubs is killed (a dead or stuck stub made 2.51 wait 30 s and more; docs/architecture.md)
    exit_timeout_s: int = 4
    log_verbose: int = 0
    watchdog: bool = True  # reload models whose stub process died
    restart_on_crash: bool = True  # start tritonserver again when it dies on its own (see supervisor.py)
    # the environment the stubs embed: $VOCOS_RUNTIME_PYTHON (the Makefile's lean runtime) or this one
    runtime_python: Path = field(default_factory=default_runtime_python)
    # an installed tritonserver (root folder) instead of the wheel's: $VOCOS_TRITONSERVER or None
    tritonserver: Optional[Path] = field(default_factory=default_tritonserver)
    metrics_config: Sequence[str] = DEFAULT_METRICS_CONFIG
    extra_args: List[str] = field(default_factory=list)
    # The repository API (load runs uploaded code), shared memory, trace and log settings need this
    # key; the file is created (mode 0600) when absent. None: <build_dir>/admin.key.
    admin_key_file: Optional[Path] = None
    admin_key: bool = True  # False: nothing restricted (loopback experiments only; warned about elsewhere)
    api_key_file: Optional[Path] = None  # when set, inference needs the key it holds
    tls: Optional[Tls] = None  # gRPC over TLS (mutual when tls.ca is set)
    # The public gRPC port is the guard (vocos_triton.launcher.guard), which keeps client cancellations from
    # tritonserver (2.51 can crash on them); False: tritonserver's own gRPC on the port (experiments only)
    guard: bool = True
    # inference calls per model the guard lets into tritonserver at once; more are refused as busy
    guard_max_in_flight: int = MAX_IN_FLIGHT
    # The TorchScript stubs of CPU instances run their forwards in workers forked from one process that
    # imported torch (vocos_triton.serving.torch_host), instead of importing torch each; False: each stub
    # imports torch itself (about 140 MB more per stub). The GPU profile never uses the host.
    torch_host: bool = True

    @property
    def admin_key_path(self) -> Optional[Path]:
        if not self.admin_key:
            return None
        return self.admin_key_file if self.admin_key_file is not None else self.build_dir / "admin.key"

    def distribution(self, python_version: Optional[str] = None) -> TritonDistribution:
        """The tritonserver to run: the installation in ``tritonserver``, else the wheel's."""
        if self.tritonserver is not None:
            return TritonDistribution.installed(self.tritonserver)
        return TritonDistribution.find(python_version)


#: how each stub's shared-memory region (the Python backend's requests and responses pass through it)
#: grows: 64 MB at a time, about the largest batch of the contract (eight 60 s items in and out), so a
#: burst grows it once instead of dozens of times. With the backend's 1 MB growth, bursts of 60 s requests
#: crashed tritonserver 2.51 in the first burst; with 64 MB, 40 bursts did not on one machine, but on a later
#: one it crashed within 1-9 bursts, as did regions that never grew: growth is not the crash's cause, only
#: the intake's speed (docs/performance.md). The region still starts at the backend's 1 MB (a larger start is
#: fallocated: 3 GB of tmpfs for the twelve stubs), and never shrinks (docs/architecture.md, "The launcher").
PYTHON_BACKEND_SHM = {"shm-growth-byte-size": 64 << 20}


class TritonServer:
    """A tritonserver process on a model repository; a context manager that stops it on exit."""

    def __init__(self, options: ServerOptions, log_file: Optional[Path] = None) -> None:
        self.options = options
        self.log_file = log_file
        self.process: Optional[subprocess.Popen] = None
        self.watchdog: Optional[StubWatchdog] = None
        self.supervisor: Optional[ServerSupervisor] = None
        self._stopped = False  # set by stop(): a restart in progress must not outlive it
        # the stubs' /dev/shm regions, read when the server became ready: a stub that exits by itself
        # when its server died takes its region's name with it, not the region
        self.known_regions: List[Path] = []
        self._command: List[str] = []
        self._environment: Dict[str, str] = {}
        self.runtime: Optional[Runtime] = None
        self._log_handle: Optional[IO[bytes]] = None
        self._admin_key: Optional[str] = None
        self._api_key: Optional[str] = None
        self.guard: Optional[GuardProcess] = None
        self.torch_host: Optional[TorchHostProcess] = None
        self.holding_dir: Optional[Path] = None  # the stubs' holding files, for the watchdog
        # tritonserver's own gRPC port: the public one without the guard, a loopback one behind it
        self.upstream_grpc_port = options.grpc_port

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def admin_headers(self) -> Dict[str, str]:
        """gRPC metadata that carries the admin key (e.g. ``client.load_model(m, headers=...)``)."""
        return grpc_headers(Access.ADMIN_KEY, self._admin_key)

    def api_headers(self) -> Dict[str, str]:
        """gRPC metadata that carries the API key (empty when inference is open)."""
        return grpc_headers(Access.API_KEY, self._api_key)

    def read_keys(self) -> None:
        """Read (or create) the key files; called by :meth:`start`."""
        o = self.options
        try:
            if o.admin_key_path is not None:
                o.admin_key_path.parent.mkdir(parents=True, exist_ok=True)
                self._admin_key = read_or_create_key(o.admin_key_path)
            self._api_key = read_key(o.api_key_file) if o.api_key_file is not None else None
            if o.tls is not None:
                o.tls.check()
        except AccessError as exc:
            raise LaunchError(str(exc)) from exc

    def command(self, distribution: TritonDistribution, backend_dir: Path) -> List[str]:
        o = self.options
        args = [
            str(distribution.binary),
            f"--model-repository={o.model_repository}",
            f"--backend-directory={backend_dir}",
            # behind the guard, tritonserver's gRPC listens on loopback only
            f"--grpc-address={GUARD_UPSTREAM_HOST if o.guard else o.host}", f"--grpc-port={self.upstream_grpc_port}",
            f"--http-address={o.host}", f"--http-port={o.http_port}",
            f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
            # explicit mode lets us reload a model whose stub died (tritonserver 2.51 never restarts one)
            "--model-control-mode=explicit", "--load-model=*",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--log-verbose={o.log_verbose}",
        ]
        args += [f"--backend-config=python,{key}={value}" for key, value in PYTHON_BACKEND_SHM.items()]
        args += [f"--metrics-config={setting}" for setting in o.metrics_config]
        config_name = PROFILES[o.profile]
        if config_name:
            args.append(f"--model-config-name={config_name}")
        args += restriction_args(self._admin_key, self._api_key)
        if o.tls is not None and not o.guard:  # behind the guard, TLS ends at the guard
            args += o.tls.args()
        return args + list(o.extra_args)

    def environment(self, distribution: TritonDistribution, runtime: Runtime) -> dict:
        env = dict(os.environ)
        # The stub embeds the first python3 on PATH: the runtime's, so model.py sees our package there.
        env["PATH"] = os.pathsep.join([str(runtime.bin_dir), env.get("PATH", "")])
        env.update(threading_environment(env))
        # the stubs (from model.py's first line) and the torch host compute below the launcher's (priority.py)
        env[COMPUTE_NICE_ENV] = str(compute_nice(os.getpriority(os.PRIO_PROCESS, 0)))
        env.update(TRITONSERVER_HEAP_ENVIRONMENT)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in [str(distribution.library_dir), env.get("LD_LIBRARY_PATH", "")] if p)
        return env

    def start(self, ready_timeout_s: float = 180.0) -> TritonServer:
        o = self.options
        if o.profile not in PROFILES:
            raise LaunchError(f"unknown profile {o.profile!r}; expected one of {sorted(PROFILES)}")
        if not any(o.model_repository.glob("*/1/model.pt")):
            raise LaunchError(f"{o.model_repository}: no model.pt artifacts; build them first (make repository)")
        problems = check_repository(o.model_repository)
        if problems:
            raise LaunchError(f"{o.model_repository}: refusing to start, the repository disagrees with itself:\n  "
                              + "\n  ".join(problems))
        ports = {"gRPC": o.grpc_port, "HTTP": o.http_port, "Metrics": o.metrics_port}
        if len(set(ports.values())) < len(ports):
            raise LaunchError(f"the gRPC, HTTP and metrics ports must differ; got {ports}")
        for what, port in ports.items():
            ensure_port_free(o.host, port, what)
        self._stopped = False
        self.upstream_grpc_port = free_port(GUARD_UPSTREAM_HOST) if o.guard else o.grpc_port
        self.read_keys()
        self.runtime = runtime = self.check_runtime()
        precompile_models(o.model_repository, runtime.python)
        distribution = o.distribution(runtime.python_version)
        backend_dir = distribution.assemble_backends(o.build_dir)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")
        self._command = self.command(distribution, backend_dir)
        self._environment = self.environment(distribution, runtime)
        log.info("starting %s", redact(self._command, [self._admin_key, self._api_key]))
        try:
            if o.guard:  # the stubs note which guard calls they hold (vocos_triton.serving.holding)
                self.holding_dir = Path(tempfile.mkdtemp(prefix="vocos-holding-"))
                self._environment[HOLDING_DIR_ENV] = str(self.holding_dir)
            if o.torch_host and o.profile != "gpu":
                self.torch_host = TorchHostProcess(runtime.python, self._environment, self._log_handle)
                self.torch_host.start()
                self._environment[TORCH_HOST_ENV] = str(self.torch_host.socket_path)
            self.relaunch(ready_timeout_s)
            if o.guard:
                self.guard = GuardProcess(o.host, o.grpc_port, f"{GUARD_UPSTREAM_HOST}:{self.upstream_grpc_port}",
                                          o.tls, self._log_handle, grace_s=o.exit_timeout_s,
                                          max_in_flight=o.guard_max_in_flight)
                self.guard.start()
        except LaunchError:
            self.stop()
            raise
        except OSError as exc:
            self.stop()
            raise LaunchError(f"the gRPC guard or the torch host did not start: {exc}") from exc
        if o.restart_on_crash:
            self.supervisor = ServerSupervisor(self)
            self.supervisor.start()
        return self

    def relaunch(self, ready_timeout_s: float = 180.0) -> None:
        """Start the tritonserver process (again) and its watchdog, and wait until it is ready."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        output = self._log_handle
        # Its own process group (stop() kills the stubs with it) but the launcher's session: one session
        # is one scheduler group (autogroup), and across groups the stubs' health threads waited 1.2 s
        # behind the guard during bursts (serving/priority.py).
        self.process = process = subprocess.Popen(self._command, env=self._environment, stdout=output,
                                                  stderr=subprocess.STDOUT if output else None,
                                                  stdin=subprocess.DEVNULL, process_group=0)
        try:
            self.wait_ready(ready_timeout_s)
        except LaunchError:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            raise
        self.known_regions = stub_regions(group_members(process.pid))
        if self.options.watchdog:
            http_headers = {Access.ADMIN_KEY: self._admin_key} if self._admin_key else {}
            self.watchdog = StubWatchdog(self.process.pid, self.http_url, headers=http_headers,
                                         notify=self._tell_guard, holding_dir=self.holding_dir)
            self.watchdog.start()

    def _tell_guard(self, event: str, models: Sequence[str], calls: Optional[Sequence[int]]) -> None:
        """The watchdog's notices of stub repairs, for the guard (which sends again what a dead stub held)."""
        guard = self.guard
        if guard is not None:
            guard.notify(event, models, calls)

    def running(self) -> bool:
        """Whether the server is up, or down and being restarted by its supervisor."""
        if self.process is not None and self.process.poll() is None:
            return True
        return self.supervisor is not None and self.supervisor.is_alive()

    def check_runtime(self) -> Runtime:
        try:
            runtime = probe(self.options.runtime_python)
        except UnusableRuntime as exc:
            raise LaunchError(str(exc)) from exc
        if self.options.profile == "gpu" and not runtime.cuda:
            raise LaunchError(f"the GPU profile needs a CUDA build of torch in the runtime, and {runtime.python} has "
                              f"torch {runtime.torch_version}; pass --runtime-python .venv/bin/python (make serve "
                              "PROFILE=gpu does)")
        log.info("serving runtime: %s", runtime.describe())
        return runtime

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._stopped:
                raise LaunchError("the server was stopped while starting")
            if self.process is not None and self.process.poll() is not None:
                hint = f"; see {self.log_file}" if self.log_file else ""
                raise LaunchError(f"tritonserver exited with code {self.process.returncode} during start-up{hint}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise LaunchError(f"tritonserver was not ready after {timeout_s:.0f} s")

    def stop(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """Stop within ``timeout_s`` (default: the exit timeout) in any state: the guard and tritonserver get
        SIGTERM and finish what is in flight meanwhile; what is still running then (a stuck unload, a model
        whose stub died, requests that need longer) is killed with its stubs, and their shared memory removed.
        Returns tritonserver's exit code (-9: it had to be killed)."""
        self._stopped = True
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.options.exit_timeout_s)
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        guard, self.guard = self.guard, None
        if guard is not None:
            guard.terminate()
        process, self.process = self.process, None
        code = None
        if process is not None and process.poll() is None:
            # the stubs' regions now, while they run: a stub killed below never removes its own
            self.known_regions = sorted(set(self.known_regions) | set(stub_regions(group_members(process.pid))))
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tritonserver still running %.0f s after SIGTERM; killing it and its stubs",
                            self.options.exit_timeout_s if timeout_s is None else timeout_s)
                os.killpg(process.pid, signal.SIGKILL)
                code = process.wait()
        elif process is not None:
            code = process.returncode
        if guard is not None:
            guard.wait(max(0.0, deadline - time.monotonic()))
        host, self.torch_host = self.torch_host, None
        if host is not None:  # its workers compute for stubs that are gone now
            host.stop()
        holding, self.holding_dir = self.holding_dir, None
        if holding is not None:
            shutil.rmtree(holding, ignore_errors=True)
        if process is not None:  # stubs outlive a killed server (and a crashed one), with their memory
            removed = clean_up_group(process.pid, self.known_regions)
            if removed:
                log.warning("removed %d shared-memory regions of a dead server's stubs", removed)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _banner(server: TritonServer) -> str:
    o = server.options
    lines = [
        f"Vocos on Triton is ready ({o.profile.upper()} profile, repository {o.model_repository})",
        f"  gRPC     {server.grpc_url}      e.g. VocosClient(\"{server.grpc_url}\")",
        f"  HTTP     {server.http_url}",
        f"  metrics  {server.metrics_url}",
        f"  runtime  {server.runtime.describe() if server.runtime else '?'}",
        # the paths, never the keys
        f"  admin key  {o.admin_key_path if o.admin_key_path else 'NONE: anyone may load/unload models'}",
        f"  API key    {o.api_key_file if o.api_key_file else 'none: inference is open'}",
        f"  TLS        {_tls_line(o.tls)}",
        "Ctrl-C stops the server.",
    ]
    random_models = random_weight_models(o.model_repository)
    if random_models:
        stars = "!" * 100
        lines = [stars, f"!! DEMO MODE: RANDOM WEIGHTS in {', '.join(random_models)}: the audio is noise, not speech.",
                 stars, *lines]
    return "\n".join(lines)


def _tls_line(tls: Optional[Tls]) -> str:
    if tls is None:
        return "off (gRPC is plaintext)"
    return f"gRPC, certificate {tls.cert}" + (f", mutual (clients signed by {tls.ca})" if tls.ca else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve the Vocos model repository with the bundled tritonserver.")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR / "triton")
    parser.add_argument("--exit-timeout", type=int, default=ServerOptions.exit_timeout_s,
                        help="seconds requests in flight get after SIGTERM; then the server and its stubs are "
                             "killed (stop never takes longer)")
    parser.add_argument("--no-torch-host", action="store_true",
                        help="let every TorchScript stub import torch itself instead of forking its worker from "
                             "one process that imported it (about 140 MB more per stub)")
    parser.add_argument("--no-guard", action="store_true",
                        help="serve gRPC from tritonserver itself, without the guard that keeps client "
                             "cancellations from it (2.51 can crash on them; experiments only)")
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                        help="inference calls per model the gRPC guard lets into tritonserver at once; more are "
                             "refused at once as busy (UNAVAILABLE)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--runtime-python", type=Path, default=default_runtime_python(),
                        help="python of the environment the stubs embed "
                             "(default: $VOCOS_RUNTIME_PYTHON, else this one)")
    parser.add_argument("--tritonserver", type=Path, default=default_tritonserver(),
                        help="root of an installed tritonserver (bin/, lib/, backends/python/), e.g. "
                             f"/opt/tritonserver in NVIDIA's image (default: ${TRITONSERVER_ENV}, else the "
                             "nvidia-pytriton wheel's)")
    parser.add_argument("--metrics-config", type=metrics_setting, action="append", default=None,
                        metavar="KEY=VALUE",
                        help="tritonserver --metrics-config setting, repeatable (default: "
                             f"{' '.join(DEFAULT_METRICS_CONFIG)}; giving any replaces the default)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--admin-key-file", type=Path,
                      help="file holding the admin key (created, mode 0600, when absent; default "
                           "<build-dir>/admin.key)")
    keys.add_argument("--no-admin-key", action="store_true",
                      help="restrict nothing: any client may load and unload models (never on a shared network)")
    parser.add_argument("--no-restart", action="store_true",
                        help="exit when tritonserver dies instead of starting it again (let an orchestrator do it)")
    parser.add_argument("--api-key-file", type=Path, help="file holding the key inference requires (default: open)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate of the gRPC endpoint (turns TLS on)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA certificate for mutual TLS: clients must present a "
                                                    "certificate it signed")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_ca and not args.tls_cert):
        parser.error("TLS needs both --tls-cert and --tls-key (and --tls-ca only with them)")
    tls = Tls(args.tls_cert.resolve(), args.tls_key.resolve(), args.tls_ca.resolve() if args.tls_ca else None) \
        if args.tls_cert else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = TritonServer(ServerOptions(
        model_repository=args.model_repository.resolve(), host=args.host, grpc_port=args.grpc_port,
        http_port=args.http_port, metrics_port=args.metrics_port, profile=args.profile,
        build_dir=args.build_dir, exit_timeout_s=args.exit_timeout, log_verbose=args.log_verbose,
        runtime_python=args.runtime_python, tritonserver=args.tritonserver,
        metrics_config=tuple(args.metrics_config or DEFAULT_METRICS_CONFIG), admin_key_file=args.admin_key_file,
        admin_key=not args.no_admin_key, api_key_file=args.api_key_file, tls=tls,
        restart_on_crash=not args.no_restart, guard=not args.no_guard, guard_max_in_flight=args.max_in_flight,
        torch_host=not args.no_torch_host))

    stopping = []

    def request_stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    started = time.monotonic()
    try:
        server.start()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_banner(server) + f"\n(started in {time.monotonic() - started:.1f} s)", flush=True)
    # after the banner, so that they are the last thing on the screen
    for warning in exposure_warnings(args.host, tls is not None, not args.no_admin_key, args.api_key_file is not None):
        print(("!" * 100 + "\n!! " if warning.startswith("WARNING") else "") + warning, file=sys.stderr, flush=True)
    while not stopping and server.running():  # a crashed tritonserver is restarted meanwhile
        time.sleep(0.5)
    if stopping:
        print("stopping tritonserver ...", flush=True)
        server.stop()
        return 0
    code = server.process.returncode if server.process else 1
    print(f"error: tritonserver exited with code {code} and was not restarted (see the log above)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
