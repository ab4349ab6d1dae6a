"""Several tritonserver replicas on loopback, one killed under load: ``make cluster-test``.

Two phases, each a headless Locust run (``load_tests/locustfile.py``) of ``--duration`` seconds with
one replica SIGKILLed (server and stubs, as when a pod dies) ``--kill-at`` seconds in:

1. **nginx**: Locust sends to one nginx (Debian package) that ``grpc_pass``-es to three replicas
   (round robin; a failed upstream is retried on the next one and left out for a while);
2. **client-side**: Locust's channels get the three replicas' addresses and spread requests with
   gRPC's round_robin policy and health checks, as ``VocosClient(["h1:p", "h2:p", "h3:p"])`` does.
   Afterwards one gRPC stream of 12 requests shows that a stream stays on one replica, while 12
   unary calls of the same client spread.

Users resend a request that failed ``UNAVAILABLE`` (``--retries``): the bar is zero failed requests.
Each replica's share comes from its own ``/metrics`` (``nv_inference_request_success``), read every
second and just before the kill. The replicas serve a slim copy of the repository with only the two
models the load needs (``mel_features`` makes the pool's mels, ``vocos_mel`` takes the load).

    python load_tests/cluster_test.py [--repository model_repository] [--duration 60] [--kill-at 20]
        [--users 4] [--results-dir results]

Exit status 0 when both phases pass, 1 when one fails, 2 on set-up errors. ``tests/test_cluster.py``
runs the same thing (marked slow).
"""
from __future__ import annotations

import argparse
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import tritonclient.grpc as grpcclient

from vocos_client._common import balancing_channel_args, grpc_target
from vocos_triton.contract import Model, Tensor
from vocos_triton.launcher import metrics
from vocos_triton.launcher.server import LaunchError, ServerOptions, TritonServer, free_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_load_test  # noqa: E402  (the Locust machinery of make load-test)

log = logging.getLogger("vocos_load_test.cluster")

#: the models each replica serves: the load's path and the model that makes its inputs
SERVED = (Model.MEL_FEATURES, Model.VOCOS_MEL)
LOAD_PATH = Model.VOCOS_MEL
REQUESTS = "nv_inference_request_success"


def slim_repository(source: Path, target: Path, models: Sequence[str] = SERVED) -> Path:
    """A repository with only ``models``: configs copied, the (large) version files linked."""
    target.mkdir(parents=True, exist_ok=True)
    for model in models:
        origin = source / model
        if not any(origin.glob("1/model.pt")):
            raise LaunchError(f"{origin}: no 1/model.pt; build the repository first (make repository)")
        shutil.copytree(origin, target / model, symlinks=False, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if n == "1"])
        (target / model / "1").mkdir(exist_ok=True)
        for item in (origin / "1").iterdir():
            if item.is_file():
                link = target / model / "1" / item.name
                if not link.exists():
                    link.symlink_to(item.resolve())
    return target


# ---------------------------------------------------------------------------------------------------
# Replicas

@dataclass
class Replica:
    name: str
    server: TritonServer
    alive: bool = True
    last_count: float = 0.0  # vocos_mel successes, last read

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    def read_count(self) -> Optional[float]:
        if not self.alive:
            return None
        try:
            self.last_count = metrics.total(metrics.scrape(self.server.metrics_url, timeout_s=2), REQUESTS, LOAD_PATH)
        except OSError:
            return None
        return self.last_count

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (its own session), as a dying pod."""
        process = self.server.process
        self.alive = False
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        guard = self.server.guard  # the gRPC guard in front of it dies with the pod too
        if guard is not None and guard.process is not None and guard.process.poll() is None:
            guard.process.kill()
            guard.process.wait()
        # stopping a dead server removes the /dev/shm regions its SIGKILLed stubs left (a pod's go with it)
        self.server.stop()


def start_replica(name: str, repository: Path, work: Path, attempts: int = 3) -> Replica:
    """One replica on free ports. Three start at once, and a port that was free when picked can be taken
    by another replica before its server binds it: a failed start is retried on new ports."""
    build = work / name
    build.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        options = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                                metrics_port=free_port(), build_dir=build, exit_timeout_s=5, watchdog=False,
                                restart_on_crash=False)  # a killed replica stays dead, as a pod would
        server = TritonServer(options, log_file=build / "tritonserver.log")
        try:
            server.start(ready_timeout_s=240)
        except LaunchError as exc:
            server.stop()
            if attempt == attempts:
                raise
            log.warning("replica %s did not start (%s); trying again on other ports", name, exc)
            continue
        log.info("replica %s ready: gRPC %s, metrics %s", name, server.grpc_url, server.metrics_url)
        return Replica(name, server)
    raise AssertionError("unreachable")


class CountSampler(threading.Thread):
    """Reads every live replica's request count once a second (a killed one keeps its last value)."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        super().__init__(name="count-sampler", daemon=True)
        self.replicas = list(replicas)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(1.0):
            for replica in self.replicas:
                replica.read_count()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


# ---------------------------------------------------------------------------------------------------
# nginx

NGINX_CONF = """\
# written by load_tests/cluster_test.py: loopback only, foreground, everything in {work}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    client_max_body_size 0;
    upstream triton_grpc {{
{servers}
        keepalive 32;
    }}
    server {{
        listen {host}:{port} http2;
        location / {{
            grpc_pass grpc://triton_grpc;
            # a replica that dies mid-request: resend to the next one (gRPC calls are POSTs)
            grpc_next_upstream error timeout http_502 http_503 non_idempotent;
            grpc_next_upstream_tries 3;
            grpc_connect_timeout 2s;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground with a config in its own temp folder, proxying gRPC to ``upstreams``."""

    def __init__(self, upstreams: Sequence[str], work: Path, host: str = "127.0.0.1") -> None:
        self.binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if self.binary is None:
            raise LaunchError("nginx is not installed (make system-deps installs the Debian package)")
        self.work = work
        self.host = host
        self.port = free_port(host)
        self.process: Optional[subprocess.Popen] = None
        work.mkdir(parents=True, exist_ok=True)
        for folder in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / folder).mkdir(exist_ok=True)
            (work / folder).chmod(0o777)  # nginx's workers drop root for nobody
        servers = "\n".join(f"        server {url} max_fails=1 fail_timeout=10s;" for url in upstreams)
        self.config = work / "nginx.conf"
        self.config.write_text(NGINX_CONF.format(work=work, servers=servers, host=host, port=self.port))

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> Nginx:
        check = subprocess.run([self.binary, "-t", "-p", str(self.work), "-c", str(self.config),
                                "-e", str(self.work / "error.log")], capture_output=True, text=True)
        if check.returncode != 0:
            raise LaunchError(f"nginx rejects {self.config}: {check.stderr.strip()}")
        self.process = subprocess.Popen([self.binary, "-p", str(self.work), "-c", str(self.config),
                                         "-e", str(self.work / "error.log")], start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(f"nginx exited with {self.process.returncode}; see {self.work / 'error.log'}")
            with socket.socket() as sock:
                if sock.connect_ex((self.host, self.port)) == 0:
                    log.info("nginx on %s proxies gRPC to the replicas; config %s", self.url, self.config)
                    return self
            time.sleep(0.1)
        self.stop()
        raise LaunchError(f"nginx did not listen on {self.url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful: finish requests in flight
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# ---------------------------------------------------------------------------------------------------
# One phase

@dataclass
class ReplicaCounts:
    name: str
    url: str
    killed: bool
    before_kill: float  # requests served between test start and the kill
    after_kill: float   # requests served after the kill (0 for the killed one)


@dataclass
class PhaseResult:
    name: str
    target: str
    requests: int
    failures: int
    retried: int
    audio_s_per_s: float
    p99_ms: float
    locust_exit_code: int
    replicas: List[ReplicaCounts] = field(default_factory=list)
    stream: Dict[str, float] = field(default_factory=dict)  # replica -> requests of one stream
    unary: Dict[str, float] = field(default_factory=dict)   # replica -> 12 unary calls of the same client

    def problems(self) -> List[str]:
        """Why this phase failed (empty: it passed)."""
        found = []
        if self.requests == 0:
            found.append("no request completed")
        if self.failures:
            found.append(f"{self.failures} failed requests")
        if self.locust_exit_code != 0:
            found.append(f"Locust exited with {self.locust_exit_code}")
        for replica in self.replicas:
            if replica.before_kill <= 0:
                found.append(f"{replica.name} served nothing before the kill (no spread)")
        survivors = [r for r in self.replicas if not r.killed]
        after = sum(r.after_kill for r in survivors)
        for replica in survivors:
            if after <= 0 or replica.after_kill < 0.1 * after:
                found.append(f"{replica.name} served {replica.after_kill:.0f} of {after:.0f} requests after the kill "
                             "(the load did not spread over the survivors)")
        if self.stream and sorted(self.stream.values())[:-1] != [0.0] * (len(self.stream) - 1):
            found.append(f"one stream's requests reached several replicas: {self.stream}")
        if self.unary and sum(1 for v in self.unary.values() if v > 0) < 2:
            found.append(f"unary calls of one balanced client did not spread: {self.unary}")
        return found

    def table(self) -> str:
        lines = [f"{self.name}: {self.requests} requests, {self.failures} failed, {self.retried} resent after "
                 f"UNAVAILABLE, {self.audio_s_per_s:.1f} audio-s/s, p99 {self.p99_ms:.0f} ms (target {self.target})",
                 f"  {'replica':<10} {'gRPC':<16} {'before kill':>11} {'after kill':>10}"]
        for r in self.replicas:
            mark = "  (SIGKILLed)" if r.killed else ""
            lines.append(f"  {r.name:<10} {r.url:<16} {r.before_kill:>11.0f} {r.after_kill:>10.0f}{mark}")
        if self.stream:
            lines.append(f"  one stream of 12 requests per replica: {self.stream}; 12 unary calls: {self.unary}")
        return "\n".join(lines)


def run_phase(name: str, target: str, replicas: Sequence[Replica], victim: Replica, args: argparse.Namespace,
              results: Path) -> PhaseResult:
    """Locust through ``target`` for ``args.duration`` s; ``victim`` is SIGKILLed ``args.kill_at`` s in."""
    results.mkdir(parents=True, exist_ok=True)
    locust_args = argparse.Namespace(
        users=args.users, spawn_rate=args.users, duration=args.duration, paths=LOAD_PATH,
        request_timeout=args.request_timeout,
        locust_args=["--retries", str(args.retries), "--min-seconds", "0.5", "--max-seconds", "2",
                     "--pool-size", "6"])
    command = run_load_test.locust_command(target, locust_args, results)
    sampler = CountSampler(replicas)
    marks: Dict[str, Dict[str, float]] = {}

    finished = threading.Event()

    def kill_on_schedule() -> None:
        history = results / "locust_stats_history.csv"
        while not history.exists():  # Locust's clock starts once its request pool is built
            if finished.wait(0.2):
                return
        marks["start"] = {r.name: r.read_count() or 0.0 for r in replicas}
        if finished.wait(args.kill_at):
            return  # Locust ended early: nothing to kill
        marks["kill"] = {r.name: r.read_count() or r.last_count for r in replicas}
        log.warning("%s: SIGKILL replica %s (%s) at %.0f s", name, victim.name, victim.grpc_url, args.kill_at)
        victim.kill()
        marks["after_kill"] = {r.name: r.last_count for r in replicas}

    killer = threading.Thread(target=kill_on_schedule, name="killer", daemon=True)
    sampler.start()
    killer.start()
    log.info("%s: running %s", name, " ".join(command))
    code = run_load_test.run_locust(command, results / "locust.log",
                                    timeout_s=args.duration + args.request_timeout + 180)
    finished.set()
    killer.join(timeout=10)
    sampler.stop()
    end = {r.name: (r.read_count() if r.alive else None) for r in replicas}
    start, kill = marks.get("start", {}), marks.get("kill", {})
    counts = [ReplicaCounts(
        r.name, r.grpc_url, r is victim,
        before_kill=kill.get(r.name, 0.0) - start.get(r.name, 0.0),
        after_kill=0.0 if r is victim or end[r.name] is None else end[r.name] - kill.get(r.name, 0.0))
        for r in replicas]
    summary_file = results / "locust_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"paths": [], "retried": 0}
    total = next((row for row in summary["paths"] if row["path"] == "Aggregated"), None) or {}
    return PhaseResult(name, target, int(total.get("requests", 0)), int(total.get("failures", 0)),
                       int(summary.get("retried", 0)), float(total.get("audio_s_per_s", 0.0)),
                       float(total.get("p99_ms", 0.0)), code, counts)


def settled_counts(live: Sequence[Replica], since: Dict[str, float], requests: int) -> Dict[str, float]:
    """Each live replica's count once ``requests`` more than ``since`` have landed in all of them."""
    return metrics.settled(lambda: {r.name: r.read_count() or 0.0 for r in live},
                           lambda counts: sum(counts[n] - since[n] for n in since) >= requests)


def stream_stickiness(target: str, replicas: Sequence[Replica], requests: int = 12) -> Dict[str, Dict[str, float]]:
    """Per live replica: the requests of one gRPC stream, then of as many unary calls, on one balanced channel."""
    live = [r for r in replicas if r.alive]
    client = grpcclient.InferenceServerClient(target, channel_args=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
        *balancing_channel_args(target)])
    mel = np.random.default_rng(0).standard_normal((1, 100, 40)).astype(np.float32)
    tensor = grpcclient.InferInput(Tensor.MEL, list(mel.shape), "FP32")
    tensor.set_data_from_numpy(mel)
    try:
        assert client.is_server_ready(client_timeout=30)
        before = {r.name: r.read_count() or 0.0 for r in live}
        answers: List[object] = []
        done = threading.Event()

        def callback(result, error) -> None:
            answers.append(error if error is not None else result)
            if len(answers) == requests:
                done.set()

        client.start_stream(callback=callback)
        for index in range(requests):
            client.async_stream_infer(LOAD_PATH, [tensor], request_id=str(index))
        done.wait(120)
        client.stop_stream()
        errors = [a for a in answers if not hasattr(a, "as_numpy")]
        if len(answers) != requests or errors:
            raise RuntimeError(f"stream: {len(answers)} answers of {requests}, errors {errors[:2]}")
        middle = settled_counts(live, before, requests)
        for _ in range(requests):
            client.infer(LOAD_PATH, [tensor], client_timeout=60)
        after = settled_counts(live, middle, requests)
    finally:
        client.close()
    return {"stream": {n: middle[n] - before[n] for n in before}, "unary": {n: after[n] - middle[n] for n in before}}


# ---------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> List[PhaseResult]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = (args.results_dir / f"cluster-{stamp}").resolve()
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vocos-cluster-"))
    replicas: List[Replica] = []
    started: List[Replica] = []  # every replica this run started, for the clean-up
    nginx: Optional[Nginx] = None
    phases: List[PhaseResult] = []
    try:
        repository = slim_repository(args.repository.resolve(), work / "repository")
        began = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(start_replica, f"replica-{i}", repository, work) for i in range(3)]
            for future in futures:  # collect every one that started, even when another failed
                try:
                    started.append(future.result())
                except LaunchError:
                    continue
        if len(started) < 3:
            raise LaunchError(f"only {len(started)} of 3 replicas started; see {work}/replica-*/tritonserver.log")
        replicas = list(started)
        log.info("three replicas ready in %.0f s", time.monotonic() - began)

        nginx = Nginx([r.grpc_url for r in replicas], work / "nginx").start()
        phases.append(run_phase("nginx", nginx.url, replicas, replicas[2], args, results / "nginx"))
        nginx.stop()

        # the client-side phase starts again with three replicas: the two survivors and a fresh one
        started.append(start_replica("replica-3", repository, work))
        replicas = [replicas[0], replicas[1], started[-1]]
        target = grpc_target([r.grpc_url for r in replicas])
        phase = run_phase("client-side", target, replicas, replicas[0], args, results / "client-side")
        sticky = stream_stickiness(target, replicas)
        phase.stream, phase.unary = sticky["stream"], sticky["unary"]
        phases.append(phase)
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in started:
            if replica.alive:
                replica.server.stop()
        (results / "cluster.json").write_text(json.dumps([asdict(p) for p in phases], indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    return phases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=run_load_test.PROJECT_ROOT / "model_repository")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per phase (default 60)")
    parser.add_argument("--kill-at", type=float, default=20.0, help="seconds into the load (default 20)")
    parser.add_argument("--users", type=int, default=4, help="Locust users (default 4)")
    parser.add_argument("--retries", type=int, default=5, help="resends after UNAVAILABLE per request (default 5)")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--results-dir", type=Path, default=run_load_test.PROJECT_ROOT / "results")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    if not 0 < args.kill_at < args.duration:
        print("error: --kill-at must fall inside --duration", file=sys.stderr)
        return 2
    try:
        phases = run(args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = False
    print()
    for phase in phases:
        print(phase.table())
        problems = phase.problems()
        print("  PASS" if not problems else "  FAIL: " + "; ".join(problems))
        failed |= bool(problems)
    return 1 if failed or len(phases) != 2 else 0


if __name__ == "__main__":
    sys.exit(main())
