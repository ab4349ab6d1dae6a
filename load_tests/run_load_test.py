"""Headless Locust run against a tritonserver: ``make load-test``.

Starts its own tritonserver on free loopback ports (unless ``--url`` points at a running one), runs
``load_tests/locustfile.py`` headless for ``--duration`` with ``--users`` users, samples the server's
memory (PSS over tritonserver and its Python-backend stubs) while the load runs, stops the server and
prints a summary: requests/s, p50/p95/p99 latency, failures and audio seconds produced per wall second,
per path and in total. Everything lands in ``<results-dir>/<timestamp>/``:

- ``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``, ``locust_exceptions.csv``
  and ``report.html``: Locust's own CSV and HTML report;
- ``locust_summary.json`` / ``.csv``: final per-path requests, failures, RPS, p50/p95/p99 and audio
  seconds produced per wall second (written by the locustfile at test stop);
- ``memory.csv`` (time series) and ``memory.json`` (idle / start / end / growth, per process at the end);
- ``summary.json``: what the summary printed; ``locust.log``; ``tritonserver.log`` (own server only).

Exit status: 0 when every request succeeded, 1 when any failed (or none was made), 2 on set-up errors.

    python load_tests/run_load_test.py [--users 8] [--spawn-rate 2] [--duration 60s]
        [--paths vocos_mel,resynthesize_mel,decode_codes,resynthesize_encodec] [--results-dir results]
        [--repository model_repository] [--profile cpu] [--url HOST:PORT [--server-pid PID]]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from vocos_triton.contract import ENTRY_MODELS, STREAM_MODELS, Model
from vocos_triton.launcher.memory import process_tree_pss
from vocos_triton.launcher.server import DEFAULT_BUILD_DIR, LaunchError, ServerOptions, TritonServer, free_port

log = logging.getLogger("vocos_load_test.runner")

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
LOCUSTFILE = HERE / "locustfile.py"
MIB = 1 << 20
ALL_PATHS = ",".join(ENTRY_MODELS.values())
_MEL_STREAM, _CODES_STREAM = STREAM_MODELS["mel"], STREAM_MODELS["codes"]
#: Named mixes for --paths. "mixed": the soak of issue 13, offline and streaming users side by side, with
#: streams sent whole, paced at twice real time, and abandoned after their first audio (12 users: one each
#: for the weight-1 paths, two for the weight-2 ones).
PRESETS = {
    "mixed": ",".join([
        f"{Model.VOCOS_MEL}:2", f"{Model.DECODE_CODES}:2", Model.RESYNTHESIZE_MEL, Model.RESYNTHESIZE_ENCODEC,
        f"{_MEL_STREAM}:2", f"{_MEL_STREAM}_paced:2", _CODES_STREAM, f"{_CODES_STREAM}_paced",
        f"{_MEL_STREAM}_abandoned",
    ]),
}


def expand_paths(spec: str) -> str:
    """A preset name (``mixed``) as its path list; anything else as given."""
    return PRESETS.get(spec.strip(), spec)


# ---------------------------------------------------------------------------------------------------
# Server memory: PSS, because the stubs share torch's library pages and a sum of RSS counts them N times

@dataclass
class MemorySample:
    elapsed_s: float
    pss_bytes: int
    processes: int
    per_process: Dict[str, int] = field(default_factory=dict)


def server_tree_memory(pid: int, elapsed_s: float = 0.0, detail: bool = False) -> MemorySample:
    """Total PSS of ``pid`` and all its descendants (tritonserver and its Python-backend stubs)."""
    if not psutil.pid_exists(pid):
        raise psutil.NoSuchProcess(pid)
    report = process_tree_pss(pid)
    per_process = {name: int(mib * MIB) for name, mib in report["processes"].items()} if detail else {}
    return MemorySample(round(elapsed_s, 2), int(report["total_mb"] * MIB), len(report["processes"]), per_process)


class MemorySampler(threading.Thread):
    """Samples the server's PSS every ``interval_s`` seconds into a list (and ``memory.csv``)."""

    def __init__(self, pid: int, interval_s: float, csv_path: Path) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.csv_path = csv_path
        self.samples: List[MemorySample] = []
        self._stop_event = threading.Event()
        self._started_at = time.monotonic()

    def run(self) -> None:
        with open(self.csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["elapsed_s", "pss_mib", "processes"])
            while not self._stop_event.is_set():
                try:
                    sample = server_tree_memory(self.pid, time.monotonic() - self._started_at)
                except psutil.NoSuchProcess:
                    log.warning("server process %d is gone; memory sampling stops", self.pid)
                    return
                self.samples.append(sample)
                writer.writerow([sample.elapsed_s, round(sample.pss_bytes / 2**20, 1), sample.processes])
                handle.flush()
                self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def find_listener_pid(port: int) -> Optional[int]:
    """The process listening on TCP ``port`` (for ``--url``), if this user may see it."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
                return connection.pid
    except psutil.AccessDenied:
        pass
    return None


# ---------------------------------------------------------------------------------------------------
# Locust

def parse_duration(text: str) -> float:
    """Locust's run-time syntax (``90``, ``60s``, ``2m``, ``1h30m``) in seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 60s, 2m, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def locust_command(url: str, args: argparse.Namespace, results: Path) -> List[str]:
    """The headless Locust command line, run by this interpreter (its gevent, tritonclient and our packages):
    not the ``locust`` script beside it, whose ``#!`` line may name another environment's python."""
    base = [sys.executable, "-m", "locust"]
    return base + [
        "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{int(round(args.duration))}s",
        "--host", url, "--paths", args.paths, "--request-timeout", str(args.request_timeout),
        "--csv", str(results / "locust"), "--html", str(results / "report.html"),
        "--only-summary",  # the periodic tables would bury the runner's summary; the CSV history has them
        # At the end, let requests in flight finish: killing them would drop exactly the slowest ones
        # from the latency percentiles (and a path whose requests all outlast the run would vanish).
        "--stop-timeout", f"{int(math.ceil(args.request_timeout))}s",
    ] + list(args.locust_args)


def run_locust(command: Sequence[str], log_path: Path, timeout_s: float) -> int:
    """Run Locust, copying its output to the terminal and ``locust.log``; kill it if it overstays."""
    with open(log_path, "w") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=PROJECT_ROOT, start_new_session=True)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                sink.write(line)
                sink.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("locust did not finish within %.0f s; killing it", timeout_s)
            os.killpg(process.pid, 9)
            code = process.wait()
        except KeyboardInterrupt:
            os.killpg(process.pid, 2)  # let Locust write its reports
            code = process.wait(timeout=30)
        pumper.join(timeout=5)
        return code


# ---------------------------------------------------------------------------------------------------
# Summary

def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def read_locust_stats(stats_csv: Path) -> List[dict]:
    """Rows of Locust's ``*_stats.csv`` (one per path, then ``Aggregated``) as plain numbers.

    Locust rewrites that file once a second, so it may miss the last requests of the run.
    """
    rows = []
    with open(stats_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({
                "path": row["Name"],
                "requests": int(_number(row["Request Count"])),
                "failures": int(_number(row["Failure Count"])),
                "rps": round(_number(row["Requests/s"]), 3),
                "p50_ms": _number(row["50%"]),
                "p95_ms": _number(row["95%"]),
                "p99_ms": _number(row["99%"]),
                "avg_ms": round(_number(row["Average Response Time"]), 1),
                "max_ms": _number(row["Max Response Time"]),
            })
    return rows


def read_summary(results: Path) -> List[dict]:
    """Per-path rows: the locustfile's final summary, else (Locust died early) Locust's own CSV."""
    summary = results / "locust_summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["paths"]
    stats_csv = results / "locust_stats.csv"
    if not stats_csv.exists():
        return []
    log.warning("%s is missing; latencies from %s, audio throughput unknown", summary, stats_csv)
    rows = read_locust_stats(stats_csv)
    for row in rows:
        row.update(audio_seconds=0.0, audio_s_per_s=0.0)
    return rows


def read_streaming(results: Path) -> List[dict]:
    """The locustfile's streaming statistics per streaming path (time to first audio, largest gap, chunk
    latency); empty when no streaming path ran."""
    summary = results / "locust_summary.json"
    if not summary.exists():
        return []
    return json.loads(summary.read_text()).get("streaming", [])


def format_streaming_table(rows: List[dict]) -> str:
    """One line per streaming path and statistic: count, p50/p95/p99 and max in ms."""
    header = (f"{'stream path':<30} {'statistic':<12} {'count':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'max ms':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        for statistic in ("ttfa", "max_gap", "chunk_audio"):
            stats = row.get(statistic)
            if stats:
                lines.append(f"{row['path']:<30} {statistic:<12} {stats['count']:>7} {stats['p50_ms']:>8.0f} "
                             f"{stats['p95_ms']:>8.0f} {stats['p99_ms']:>8.0f} {stats['max_ms']:>8.0f}")
    return "\n".join(lines)


def format_table(rows: List[dict]) -> str:
    header = (f"{'path':<28} {'requests':>8} {'failures':>8} {'RPS':>7} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'p99 ms':>8} {'audio-s/s':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["path"] == "Aggregated":
            lines.append("-" * len(header))
        lines.append(f"{row['path']:<28} {row['requests']:>8} {row['failures']:>8} {row['rps']:>7.2f} "
                     f"{row['p50_ms']:>8.0f} {row['p95_ms']:>8.0f} {row['p99_ms']:>8.0f} "
                     f"{row['audio_s_per_s']:>10.2f}")
    return "\n".join(lines)


@dataclass
class MemoryReport:
    """PSS of the server tree: idle (before load), start (load warmed up) and end of the load."""

    idle_bytes: Optional[int] = None
    start_bytes: Optional[int] = None
    end_bytes: Optional[int] = None
    start_elapsed_s: Optional[float] = None
    end_elapsed_s: Optional[float] = None
    growth_percent: Optional[float] = None
    per_process_end: Dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        if self.start_bytes is None or self.end_bytes is None:
            return "server memory: not measured (no server process to read; see --server-pid)"
        mib = 2**20
        idle = f"idle {self.idle_bytes / mib:.0f} MiB, " if self.idle_bytes is not None else ""
        return (f"server memory (PSS, tritonserver + stubs): {idle}start {self.start_bytes / mib:.0f} MiB "
                f"(median from t={self.start_elapsed_s:.0f} s), end {self.end_bytes / mib:.0f} MiB (median to "
                f"t={self.end_elapsed_s:.0f} s), "
                f"growth {self.growth_percent:+.1f}%")


def memory_report(idle: Optional[MemorySample], samples: List[MemorySample], warmup_s: float,
                  final: Optional[MemorySample], window_s: float = 0.0) -> MemoryReport:
    """Start = the median of the samples in the ``window_s`` after ``warmup_s`` of load (allocator pools
    and batch buffers grown once are not a leak); end = the median of the last ``window_s`` of samples.
    Medians, because one sample swings by a batch's activations (±10 % under a mixed load); with
    ``window_s`` 0 they are single samples. Growth is end vs start."""
    report = MemoryReport(idle_bytes=idle.pss_bytes if idle else None)
    if not samples:
        return report
    warm = [s for s in samples if s.elapsed_s >= warmup_s] or samples[-1:]
    first = [s for s in warm if s.elapsed_s <= warm[0].elapsed_s + window_s]
    last = [s for s in samples if s.elapsed_s >= samples[-1].elapsed_s - window_s]
    report.start_bytes = int(statistics.median(s.pss_bytes for s in first))
    report.end_bytes = int(statistics.median(s.pss_bytes for s in last))
    report.start_elapsed_s, report.end_elapsed_s = warm[0].elapsed_s, samples[-1].elapsed_s
    report.growth_percent = round(100.0 * (report.end_bytes - report.start_bytes) / report.start_bytes, 2)
    if final is not None:
        report.per_process_end = final.per_process
    return report


# ---------------------------------------------------------------------------------------------------

@dataclass
class LoadTestResult:
    results_dir: Path
    exit_code: int
    rows: List[dict]
    memory: MemoryReport
    streaming: List[dict] = field(default_factory=list)


def run(args: argparse.Namespace) -> LoadTestResult:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = (args.results_dir / stamp).resolve()
    results.mkdir(parents=True, exist_ok=True)
    server: Optional[TritonServer] = None
    server_pid: Optional[int] = args.server_pid
    try:
        if args.url:
            url = args.url
            if server_pid is None:
                port = int(url.rsplit(":", 1)[-1].rstrip("/"))
                server_pid = find_listener_pid(port)
        else:
            repository = args.repository.resolve()
            options = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                                    metrics_port=free_port(), profile=args.profile, build_dir=args.build_dir)
            server = TritonServer(options, log_file=results / "tritonserver.log")
            log.info("starting tritonserver on %s (repository %s, %s profile); log: %s", server.grpc_url,
                     repository, args.profile, results / "tritonserver.log")
            began = time.monotonic()
            server.start()
            log.info("tritonserver ready in %.1f s", time.monotonic() - began)
            url = server.grpc_url
            server_pid = server.process.pid if server.process else None

        idle = server_tree_memory(server_pid) if server_pid else None
        sampler = None
        if server_pid:
            sampler = MemorySampler(server_pid, args.memory_interval, results / "memory.csv")
            sampler.start()
        else:
            log.warning("no server process found for %s: memory is not measured (pass --server-pid)", url)

        command = locust_command(url, args, results)
        log.info("running: %s", " ".join(command))
        # Locust needs a few seconds to import and build its request pool before the clock starts.
        locust_code = run_locust(command, results / "locust.log", timeout_s=args.duration + args.request_timeout + 120)
        final = server_tree_memory(server_pid, detail=True) if server_pid and psutil.pid_exists(server_pid) else None
        if sampler is not None:
            sampler.stop()
        samples = sampler.samples if sampler is not None else []
        memory = memory_report(idle, samples, warmup_s=min(args.memory_warmup, args.duration / 3), final=final,
                               window_s=min(60.0, args.duration / 10))
    finally:
        if server is not None:
            server.stop()

    rows = read_summary(results)
    streaming = read_streaming(results)
    aggregated = next((r for r in rows if r["path"] == "Aggregated"), None)
    idle_paths = [r["path"] for r in rows if r["path"] != "Aggregated" and r["requests"] == 0]
    for path in idle_paths:
        log.error("%s completed no request during the run (too few users for the paths, or a stuck server)", path)
    failed = (aggregated is None or aggregated["requests"] == 0 or aggregated["failures"] > 0 or bool(idle_paths)
              or locust_code != 0)
    (results / "memory.json").write_text(json.dumps(asdict(memory), indent=2) + "\n")
    (results / "summary.json").write_text(json.dumps({
        "url": url, "users": args.users, "spawn_rate": args.spawn_rate, "duration_s": args.duration,
        "paths": args.paths, "locust_exit_code": locust_code, "rows": rows, "streaming": streaming,
        "memory": asdict(memory),
    }, indent=2) + "\n")
    return LoadTestResult(results, 1 if failed else 0, rows, memory, streaming)


def print_summary(result: LoadTestResult, args: argparse.Namespace) -> None:
    print()
    print(f"=== Vocos on Triton load test: {args.users} users, {args.duration:.0f} s, paths {args.paths} ===")
    if result.rows:
        print(format_table(result.rows))
    else:
        print("no Locust statistics were written (see locust.log)")
    if result.streaming:
        print("streams: time to first audio (ttfa), largest gap between audio pieces (max_gap), paced chunk -> "
              "its audio (chunk_audio)")
        print(format_streaming_table(result.streaming))
    print(result.memory.text())
    if result.memory.per_process_end:
        top = sorted(result.memory.per_process_end.items(), key=lambda item: -item[1])
        print("  at the end: " + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in top))
    print(f"results: {result.results_dir}  (report.html, locust_stats.csv, locust_summary.json, memory.json)")
    print("PASS: no failed requests" if result.exit_code == 0 else "FAIL: failed requests, a path without requests, "
          "or Locust exited with an error (see locust.log)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", "-u", type=int, default=8, help="concurrent Locust users (default 8)")
    parser.add_argument("--spawn-rate", "-r", type=float, default=2.0, help="users started per second (default 2)")
    parser.add_argument("--duration", "-t", type=parse_duration, default=parse_duration("60s"),
                        help="run time, Locust syntax: 60s, 10m (default 60s)")
    parser.add_argument("--paths", default=ALL_PATHS,
                        help=f"paths with optional weights, e.g. 'vocos_mel:3,decode_codes' (default {ALL_PATHS}); "
                             f"streaming: {_MEL_STREAM}, {_CODES_STREAM}, each also _paced and _abandoned; or a "
                             f"preset: {', '.join(PRESETS)} ({PRESETS['mixed']})")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="per-request deadline, s (default 60)")
    parser.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "results",
                        help="parent of the timestamped results folder (default results/)")
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository",
                        help="model repository built by `make repository` (default model_repository/)")
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu", help="deployment profile (default cpu)")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help="target a running server's gRPC HOST:PORT instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="tritonserver pid for memory sampling with --url (default: whoever listens on the port)")
    parser.add_argument("--memory-interval", type=float, default=2.0, help="seconds between PSS samples (default 2)")
    parser.add_argument("--memory-warmup", type=float, default=60.0,
                        help="seconds of load before the 'start' memory window (at most a third of the run; "
                             "default 60); start and end are medians over a tenth of the run, at most 60 s")
    parser.add_argument("locust_args", nargs=argparse.REMAINDER,
                        help="after '--': extra Locust options, e.g. -- --pool-size 24 --think-time 0.5")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.locust_args and args.locust_args[0] == "--":
        args.locust_args = args.locust_args[1:]
    args.paths = expand_paths(args.paths)
    if args.users < 1 or args.spawn_rate <= 0 or args.duration <= 0:
        parser.error("--users, --spawn-rate and --duration must be positive")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    if not args.url and not any(args.repository.glob("*/1/model.pt")):
        print(f"error: {args.repository} has no model.pt artifacts; build it first (make repository)", file=sys.stderr)
        return 2
    selected = [item.split(":")[0] for item in args.paths.split(",") if item.strip() and not item.endswith(":0")]
    if args.users < len(selected):
        log.warning("%d users for %d paths: Locust gives each user one path, so some paths get no user",
                    args.users, len(selected))
    try:
        result = run(args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(result, args)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
