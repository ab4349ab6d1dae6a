"""Shedding under overload: ``make overload``. Benchmark output, not a timed test.

Starts its own tritonserver on free loopback ports (unless ``--url`` names a running one), then:

1. **Capacity (1x)**: a closed loop of ``--concurrency`` callers sending ``--clip-seconds`` clips to
   ``resynthesize_mel`` for ``--capacity-seconds``; capacity = completed requests per second.
2. **Open loop at ``--load`` x capacity** for ``--seconds``: Poisson arrivals, each call with a
   ``--deadline`` s deadline and no retries (so every refusal is seen as the server gave it). Prints the
   throughput completed within the deadline against the capacity (target >= 80 %) and the p95 time
   the server took to refuse a request it had no room for (target <= 50 ms).
3. **Bursts**: ``--bursts`` times ``--burst`` concurrent ``--burst-clip-seconds`` clips with
   ``--burst-deadline`` s deadlines, sent by plain tritonclient (a gRPC deadline only: each call whose
   deadline passes is a cancellation, which tritonserver 2.51 can crash on; the guard keeps them from it).
   Counts tritonserver restarts (target 0); after each burst's deadlines one more clip is timed (target
   <= 1 s), and after the first, the server's PSS (tritonserver + stubs + guard) is sampled until it is
   back within 200 MB of its pre-burst level (target <= 30 s).
4. **Stub kill** (a server it started): a closed loop of plain calls (no retries) while one stub of
   ``vocos_mel`` is SIGKILLed; the share of failed calls (target <= 1 %) and the p99 latency from the kill
   until the watchdog's repair (target <= 1 s).
5. **Stop** under that load, after the repair (target <= 5 s), and the idle PSS measured at the start
   (target <= 1.5 GB).

Where the machine has two CPUs or more, the server (its processes inherit it) runs on all CPUs but the
last and the load generator on the last (``--no-pin`` turns it off): a generator on the server's cores
measures itself.

Each call is one attempt made the way the SDK makes it (the deadline as gRPC deadline and as Triton's
request timeout, the SDK's error mapping) from tensors serialized once, so that the client takes as
little of the shared CPU as it can. Everything is also written to ``<out>/overload.json``. The
numbers depend on the CPU and on what else runs on it: the script prints the CPU model with them.

    python load_tests/overload.py [--repository model_repository] [--profile cpu] [--seconds 60]
        [--load 3] [--deadline 2] [--burst 200] [--burst-clip-seconds 60] [--burst-deadline 5]
        [--bursts 10] [--out results/overload] [--url HOST:PORT --server-pid PID] [--no-pin]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Optional, Sequence

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from vocos_client import DeadlineExceededError, ServerBusyError, VocosError
from vocos_client._common import request_timeout_us
from vocos_client._errors import from_triton
from vocos_triton.contract import MEL_24KHZ, Model, Tensor
from vocos_triton.launcher.memory import process_tree, process_tree_pss
from vocos_triton.launcher.server import LaunchError, ServerOptions, TritonServer, free_port
from vocos_triton.launcher.watchdog import python_stubs
from vocos_triton.speech import speech_clip

MODEL = Model.RESYNTHESIZE_MEL  # audio in: the SDK sends it here without a bandwidth


@dataclass
class Outcome:
    sent_at: float
    seconds: float
    kind: str  # ok, late (answered after the deadline), busy, deadline, error
    message: str = ""


@dataclass
class Report:
    cpu: str
    capacity_rps: float = 0.0
    open_loop: Dict[str, float] = field(default_factory=dict)
    burst: Dict[str, float] = field(default_factory=dict)
    bursts: List[Dict[str, float]] = field(default_factory=list)
    pinning: str = ""
    idle_pss_mb: float = float("nan")
    stub_kill: Dict[str, float] = field(default_factory=dict)
    stop_s: float = float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def request_inputs(audio: np.ndarray) -> list:
    """The request's tensors, serialized once and reused by every call: the client shares the two cores
    with the server, and 200 x 60 s clips prepared per call (1.1 GB) kept the burst from ever reaching
    it within its deadlines."""
    batch = np.ascontiguousarray(audio[None], dtype=np.float32)
    tensor = aioclient.InferInput(Tensor.AUDIO, list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return [tensor]


async def call(client: aioclient.InferenceServerClient, inputs: list, deadline: float) -> Outcome:
    """One attempt as the SDK makes it (deadline as gRPC deadline and as Triton's request timeout, its
    error mapping), without retries, so that every refusal is seen as the server gave it."""
    start = time.monotonic()
    try:
        try:
            await client.infer(MODEL, inputs, client_timeout=deadline, timeout=request_timeout_us(deadline))
        except InferenceServerException as exc:
            raise from_triton(exc) from exc
        elapsed = time.monotonic() - start
        return Outcome(start, elapsed, "ok" if elapsed <= deadline else "late")
    except ServerBusyError as exc:
        return Outcome(start, time.monotonic() - start, "busy", exc.message[:120])
    except DeadlineExceededError as exc:
        return Outcome(start, time.monotonic() - start, "deadline", exc.message[:120])
    except VocosError as exc:
        # a model that answers at once because the forward would end after the deadline: a deadline outcome
        kind = "deadline" if "deadline would pass" in exc.message else "error"
        return Outcome(start, time.monotonic() - start, kind, f"{type(exc).__name__}: {exc.message[:120]}")


async def plain_call(client: aioclient.InferenceServerClient, inputs: list, deadline: float) -> Outcome:
    """One call as plain tritonclient makes it: a gRPC deadline and nothing else (no Triton timeout)."""
    start = time.monotonic()
    try:
        await client.infer(MODEL, inputs, client_timeout=deadline)
        elapsed = time.monotonic() - start
        return Outcome(start, elapsed, "ok" if elapsed <= deadline else "late")
    except InferenceServerException as exc:
        kind = {"StatusCode.DEADLINE_EXCEEDED": "deadline", "StatusCode.UNAVAILABLE": "busy"}.get(exc.status(), "error")
        return Outcome(start, time.monotonic() - start, kind, f"{exc.status()}: {exc.message()}"[:160])


async def closed_loop(concurrency: int, seconds: float, attempt: Callable[[], Awaitable[Outcome]],
                      outcomes: List[Outcome]) -> None:
    """``concurrency`` callers, each making ``attempt()`` after ``attempt()`` for ``seconds``; every outcome
    is appended to ``outcomes`` as it comes (a caller may read them meanwhile)."""
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop_at:
            outcomes.append(await attempt())

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def capacity(client: aioclient.InferenceServerClient, audio: list, seconds: float, concurrency: int) -> float:
    """Completed requests per second of a closed loop of ``concurrency`` callers (no deadline pressure)."""
    done: List[Outcome] = []
    start = time.monotonic()
    await closed_loop(concurrency, seconds, lambda: call(client, audio, 120.0), done)
    ok = sum(o.kind == "ok" for o in done)
    return ok / (time.monotonic() - start)


async def open_loop(client: aioclient.InferenceServerClient, audio: list, rate: float, seconds: float,
                    deadline: float) -> List[Outcome]:
    """Poisson arrivals at ``rate`` per second for ``seconds``; each call on its own, never awaited by the next."""
    rng = random.Random(14)
    tasks = []
    start = time.monotonic()
    next_at = start
    while next_at < start + seconds:
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(call(client, audio, deadline)))
        next_at += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize_open_loop(outcomes: List[Outcome], seconds: float, capacity_rps: float, rate: float) -> Dict[str, float]:
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("ok", "late", "busy", "deadline", "error")}
    busy = [o.seconds for o in outcomes if o.kind == "busy"]
    goodput = kinds["ok"] / seconds
    return {"offered_rps": rate, "sent": len(outcomes), **{f"n_{k}": float(v) for k, v in kinds.items()},
            "goodput_rps": goodput, "goodput_vs_capacity": goodput / capacity_rps if capacity_rps else float("nan"),
            "refused_p50_ms": percentile(busy, 50) * 1000, "refused_p95_ms": percentile(busy, 95) * 1000,
            "ok_p95_ms": percentile([o.seconds for o in outcomes if o.kind == "ok"], 95) * 1000}


class PssSampler(threading.Thread):
    """PSS of the server's process tree every ``interval_s``: (monotonic time, MB)."""

    def __init__(self, pids: Sequence[int], interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval_s = list(pids), interval_s
        self.samples: List[tuple] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic(), server_pss_mb(self.pids)))
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def server_pss_mb(pids: Sequence[int]) -> float:
    """PSS of the server: tritonserver's process tree and the guard's."""
    return float(sum(process_tree_pss(pid)["total_mb"] for pid in pids))


async def burst(client: aioclient.InferenceServerClient, pids: Sequence[int], n: int, clip_seconds: float,
                deadline: float, probe: list, settle_s: float) -> Dict[str, float]:
    long_audio = request_inputs(speech_clip(int(clip_seconds * MEL_24KHZ.sample_rate), seed=3))
    pid = pids[0] if pids else None
    sampler = PssSampler(pids) if pid and settle_s > 0 else None
    before = server_pss_mb(pids) if pid else float("nan")
    if sampler:
        sampler.start()
    start = time.monotonic()

    async def probe_after_the_deadlines() -> Outcome:
        # the burst's deadlines have passed (its calls may still be returning): from here on the server
        # owes them nothing, so a new request must not wait behind their work
        await asyncio.sleep(deadline + 0.1)
        return await call(client, probe, 60.0)

    probing = asyncio.ensure_future(probe_after_the_deadlines())
    outcomes = await asyncio.gather(*(plain_call(client, long_audio, deadline) for _ in range(n)))
    returned = time.monotonic()
    first = await probing
    result = {"n": float(n), "clip_seconds": clip_seconds, "deadline_s": deadline,
              "n_ok": float(sum(o.kind == "ok" for o in outcomes)),
              "n_busy": float(sum(o.kind == "busy" for o in outcomes)),
              "n_deadline": float(sum(o.kind == "deadline" for o in outcomes)),
              "n_error": float(sum(o.kind in ("error", "late") for o in outcomes)),
              "all_returned_after_s": returned - start,
              "first_request_after_s": first.seconds if first.kind == "ok" else float("nan"),
              "first_request_outcome": f"{first.kind} {first.message}".strip(),
              "pss_before_mb": before}
    if sampler:
        settle_until = time.monotonic() + settle_s
        back_at = None
        while time.monotonic() < settle_until:
            now_mb = server_pss_mb(pids)
            if now_mb <= before + 200 and back_at is None:
                back_at = time.monotonic()
                break
            await asyncio.sleep(0.5)
        sampler.stop()
        result["pss_peak_mb"] = max(mb for _, mb in sampler.samples)
        result["pss_after_mb"] = server_pss_mb(pids)
        result["pss_back_within_200mb_after_s"] = (back_at - returned) if back_at else float("nan")
    return result


def pin(pids: Sequence[int], cpus: Sequence[int]) -> None:
    """Every thread of ``pids`` (and their descendants) onto ``cpus``."""
    for pid in {p for root in pids for p in process_tree(root)}:
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), set(cpus))
        except OSError:  # exited meanwhile
            continue


def split_cpus(enabled: bool) -> Optional[tuple]:
    """(server CPUs, load generator CPUs): the last CPU for the generator, the rest for the server; None
    on one CPU or when pinning is off."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        return None
    return cpus[:-1], cpus[-1:]


async def stub_kill(client: aioclient.InferenceServerClient, server: TritonServer, clip: list,
                    concurrency: int, seconds: float) -> Dict[str, float]:
    """Plain calls (no retries) from ``concurrency`` callers while a stub of vocos_mel is SIGKILLed."""
    outcomes: List[Outcome] = []
    stop_at = time.monotonic() + seconds
    callers = asyncio.ensure_future(closed_loop(concurrency, seconds, lambda: plain_call(client, clip, 30.0),
                                                outcomes))
    await asyncio.sleep(seconds / 3)
    victim = min(pid for pid, model in python_stubs(server.process.pid).items() if model == Model.VOCOS_MEL)
    repairs = len(server.watchdog.restarts) if server.watchdog else 0
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while server.watchdog is not None and len(server.watchdog.restarts) == repairs and time.monotonic() < stop_at:
        await asyncio.sleep(0.05)
    repaired_at = time.monotonic()
    await callers
    during = [o for o in outcomes if killed_at - o.seconds <= o.sent_at <= repaired_at]
    failed = [o for o in outcomes if o.kind != "ok"]
    return {"calls": float(len(outcomes)), "failed": float(len(failed)),
            "failed_share": len(failed) / max(1, len(outcomes)), "repair_s": repaired_at - killed_at,
            "p99_during_repair_ms": percentile([o.seconds for o in during], 99) * 1000,
            # behind the guard, the calls a dead stub held are sent again; without it they fail after 1-2 s
            "p99_answered_during_repair_ms": percentile([o.seconds for o in during if o.kind == "ok"], 99) * 1000,
            "calls_during_repair": float(len(during)),
            "first_failures": [o.message for o in failed[:3]],
            # every call around the kill: (sent, seconds after the kill; took, seconds; outcome)
            "timeline": [(round(o.sent_at - killed_at, 3), round(o.seconds, 3), o.kind) for o in outcomes
                         if killed_at - 2.0 <= o.sent_at <= repaired_at + 1.0]}


async def scenario(args: argparse.Namespace, url: str, pids: Sequence[int], report: Report,
                   server: Optional[TritonServer]) -> None:
    clip = request_inputs(speech_clip(int(args.clip_seconds * MEL_24KHZ.sample_rate), seed=1))
    client = aioclient.InferenceServerClient(url)
    try:
        await call(client, clip, 120.0)  # warm-up
        if args.capacity_seconds > 0:
            report.capacity_rps = await capacity(client, clip, args.capacity_seconds, args.concurrency)
            print(f"capacity (1x, closed loop of {args.concurrency}, {args.clip_seconds:g} s clips): "
                  f"{report.capacity_rps:.1f} requests/s", flush=True)
        if args.seconds > 0 and report.capacity_rps > 0:
            rate = args.load * report.capacity_rps
            outcomes = await open_loop(client, clip, rate, args.seconds, args.deadline)
            report.open_loop = o = summarize_open_loop(outcomes, args.seconds, report.capacity_rps, rate)
            print(f"open loop {args.load:g}x ({rate:.1f}/s for {args.seconds:g} s, {args.deadline:g} s deadlines): "
                  f"goodput {o['goodput_rps']:.1f}/s = {100 * o['goodput_vs_capacity']:.0f} % of capacity "
                  "(target >= 80 %); "
                  f"refused {o['n_busy']:.0f} in p50 {o['refused_p50_ms']:.1f} / p95 {o['refused_p95_ms']:.1f} ms "
                  f"(target <= 50 ms); deadline exceeded {o['n_deadline']:.0f}, late {o['n_late']:.0f}, "
                  f"errors {o['n_error']:.0f} of {o['sent']:.0f}", flush=True)
            errors = [x.message for x in outcomes if x.kind == "error"][:3]
            if errors:
                print(f"  first errors: {errors}", flush=True)
            await asyncio.sleep(2.0)  # let the open loop's last requests drain
        tritonserver_pid = server.process.pid if server else None
        for index in range(args.bursts if args.burst > 0 else 0):
            b = await burst(client, pids, args.burst, args.burst_clip_seconds, args.burst_deadline, clip,
                            args.settle_seconds if index == 0 else 0.0)
            b["tritonserver_restarts"] = float(server.supervisor.crashes) if server and server.supervisor \
                else float("nan")
            b["same_tritonserver"] = float(server is not None and server.process is not None
                                           and server.process.pid == tritonserver_pid)
            report.bursts.append(b)
            print(f"burst {index + 1}/{args.bursts}: {args.burst} x {args.burst_clip_seconds:g} s, "
                  f"{args.burst_deadline:g} s deadlines (plain tritonclient): ok {b['n_ok']:.0f}, "
                  f"busy {b['n_busy']:.0f}, deadline {b['n_deadline']:.0f}, errors {b['n_error']:.0f}; "
                  f"all returned after {b['all_returned_after_s']:.1f} s; next {args.clip_seconds:g} s clip "
                  f"answered in {b['first_request_after_s']:.2f} s (target <= 1 s"
                  f"{'' if b['first_request_outcome'] == 'ok' else ': ' + b['first_request_outcome']}); "
                  "tritonserver restarts so far "
                  f"{b['tritonserver_restarts']:.0f} (target 0)", flush=True)
            if "pss_peak_mb" in b:
                print(f"  server PSS: {b['pss_before_mb']:.0f} MB before, peak {b['pss_peak_mb']:.0f} MB, "
                      f"back within 200 MB after {b['pss_back_within_200mb_after_s']:.1f} s (target <= 30 s)",
                      flush=True)
        report.burst = report.bursts[0] if report.bursts else {}
        if server is not None and args.kill_seconds > 0:
            # a burst may have crashed tritonserver: the kill is measured on a server that is up again
            ready_by = time.monotonic() + 120
            while not server.is_ready() and time.monotonic() < ready_by:
                await asyncio.sleep(0.5)
            await asyncio.sleep(6.0)  # and whose stubs have given back the burst's memory
            report.stub_kill = k = await stub_kill(client, server, clip, args.concurrency, args.kill_seconds)
            print(f"stub kill: {k['failed']:.0f} of {k['calls']:.0f} plain calls failed "
                  f"({100 * k['failed_share']:.2f} %, target <= 1 %); repaired after {k['repair_s']:.1f} s; "
                  f"p99 latency from the kill to the repair {k['p99_during_repair_ms']:.0f} ms (target <= 1000 ms; "
                  f"{k['calls_during_repair']:.0f} calls, p99 of those answered "
                  f"{k['p99_answered_during_repair_ms']:.0f} ms)",
                  flush=True)
            if server is not None:  # stop after the repair, under load (target <= 5 s)
                loading = asyncio.ensure_future(capacity(client, clip, 30.0, args.concurrency))
                await asyncio.sleep(2.0)
                started = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, server.stop)
                report.stop_s = time.monotonic() - started
                print(f"stop under load after the repair: {report.stop_s:.1f} s (target <= 5 s)", flush=True)
                loading.cancel()
    finally:
        await client.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Shedding under overload (make overload).")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--url", help="a running server's gRPC HOST:PORT (default: start one)")
    parser.add_argument("--server-pid", type=int, nargs="*", default=[],
                        help="its tritonserver pid (and its guard's), for PSS and pinning (with --url)")
    parser.add_argument("--clip-seconds", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop callers for the capacity")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--load", type=float, default=3.0, help="open-loop rate as a multiple of the capacity")
    parser.add_argument("--seconds", type=float, default=60.0, help="open-loop duration")
    parser.add_argument("--deadline", type=float, default=2.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--bursts", type=int, default=10, help="how many bursts, one after another")
    parser.add_argument("--burst-clip-seconds", type=float, default=60.0)
    parser.add_argument("--burst-deadline", type=float, default=5.0)
    parser.add_argument("--settle-seconds", type=float, default=30.0, help="how long to wait for PSS to come back")
    parser.add_argument("--kill-seconds", type=float, default=30.0,
                        help="length of the stub-kill phase (0: skip it and the stop)")
    parser.add_argument("--no-pin", action="store_true", help="leave the server and the generator unpinned")
    parser.add_argument("--out", type=Path, default=Path("results/overload"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(cpu=cpu_model())
    print(f"CPU: {report.cpu}", flush=True)
    split = split_cpus(not args.no_pin)
    server = None
    try:
        if split:
            os.sched_setaffinity(0, set(split[0]))  # the server started below inherits the server CPUs
        if args.url:
            url, pids = args.url, list(args.server_pid)
            if split and pids:
                pin(pids, split[0])
        else:
            options = ServerOptions(model_repository=args.repository.resolve(), grpc_port=free_port(),
                                    http_port=free_port(), metrics_port=free_port(), profile=args.profile,
                                    build_dir=args.out / "triton")
            server = TritonServer(options, log_file=args.out / "tritonserver.log").start()
            url = server.grpc_url
            pids = [server.process.pid] + ([server.guard.process.pid] if server.guard else [])
        if split:
            os.sched_setaffinity(0, set(split[1]))
            report.pinning = (f"server on CPU {','.join(map(str, split[0]))}" +
                              ("" if not args.url or pids else " (not pinned: no --server-pid)") +
                              f", load generator on CPU {','.join(map(str, split[1]))}")
        else:
            report.pinning = "not pinned (one CPU, or --no-pin): the load generator shares the server's CPUs"
        print(f"pinning: {report.pinning}", flush=True)
        if pids:
            time.sleep(5.0)  # the stubs give back their warm-up memory after 5 s idle
            report.idle_pss_mb = server_pss_mb(pids)
            print(f"idle PSS (tritonserver, stubs, guard): {report.idle_pss_mb:.0f} MB (target <= 1500 MB)",
                  flush=True)
        asyncio.run(scenario(args, url, pids, report, server))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    (args.out / "overload.json").write_text(json.dumps(asdict(report), indent=2))
    print(f"wrote {args.out / 'overload.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
