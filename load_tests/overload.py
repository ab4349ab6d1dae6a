"""Shedding under overload: ``make overload``. Benchmark output, not a timed test.

Starts its own tritonserver on free loopback ports (unless ``--url`` names a running one), then:

1. **Capacity (1x)**: a closed loop of ``--concurrency`` callers sending ``--clip-seconds`` clips to
   ``resynthesize_mel`` for ``--capacity-seconds``; capacity = completed requests per second.
2. **Open loop at ``--load`` x capacity** for ``--seconds``: Poisson arrivals, each call with a
   ``--deadline`` s deadline and no retries (so every refusal is seen as the server gave it). Prints the
   throughput completed within the deadline against the capacity (target >= 80 %) and the p95 time
   the server took to refuse a request it had no room for (target <= 50 ms).
3. **Burst**: ``--burst`` concurrent ``--burst-clip-seconds`` clips with ``--burst-deadline`` s deadlines;
   once the deadlines have passed, one more clip is timed (target <= 1 s), and the server's
   PSS (tritonserver + stubs) is sampled until it is back within 200 MB of its pre-burst level
   (target <= 30 s).

Each call is one attempt made the way the SDK makes it (the deadline as gRPC deadline and as Triton's
request timeout, the SDK's error mapping) from tensors serialized once, so that the client takes as
little of the shared CPU as it can. Everything is also written to ``<out>/overload.json``. The
numbers depend on the CPU and on what else runs on it: the script prints the CPU model with them.

    python load_tests/overload.py [--repository model_repository] [--profile cpu] [--seconds 60]
        [--load 3] [--deadline 2] [--burst 200] [--burst-clip-seconds 60] [--burst-deadline 5]
        [--out results/overload] [--url HOST:PORT --server-pid PID]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from vocos_client import DeadlineExceededError, ServerBusyError, VocosError
from vocos_client._common import request_timeout_us
from vocos_client._errors import from_triton
from vocos_triton.contract import SAMPLE_RATE, Model, Tensor
from vocos_triton.launcher.memory import process_tree_pss
from vocos_triton.launcher.server import LaunchError, ServerOptions, TritonServer, free_port
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
        return Outcome(start, time.monotonic() - start, "error", f"{type(exc).__name__}: {exc.message[:120]}")


async def capacity(client: aioclient.InferenceServerClient, audio: list, seconds: float, concurrency: int) -> float:
    """Completed requests per second of a closed loop of ``concurrency`` callers (no deadline pressure)."""
    done: List[Outcome] = []
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop_at:
            done.append(await call(client, audio, 120.0))

    start = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
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

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples: List[tuple] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic(), float(process_tree_pss(self.pid)["total_mb"])))
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


async def burst(client: aioclient.InferenceServerClient, pid: Optional[int], n: int, clip_seconds: float,
                deadline: float, probe: list, settle_s: float) -> Dict[str, float]:
    long_audio = request_inputs(speech_clip(int(clip_seconds * SAMPLE_RATE), seed=3))
    sampler = PssSampler(pid) if pid else None
    before = float(process_tree_pss(pid)["total_mb"]) if pid else float("nan")
    if sampler:
        sampler.start()
    start = time.monotonic()

    async def probe_after_the_deadlines() -> Outcome:
        # the burst's deadlines have passed (its calls may still be returning): from here on the server
        # owes them nothing, so a new request must not wait behind their work
        await asyncio.sleep(deadline + 0.1)
        return await call(client, probe, 60.0)

    probing = asyncio.ensure_future(probe_after_the_deadlines())
    outcomes = await asyncio.gather(*(call(client, long_audio, deadline) for _ in range(n)))
    returned = time.monotonic()
    first = await probing
    result = {"n": float(n), "clip_seconds": clip_seconds, "deadline_s": deadline,
              "n_ok": float(sum(o.kind == "ok" for o in outcomes)),
              "n_busy": float(sum(o.kind == "busy" for o in outcomes)),
              "n_deadline": float(sum(o.kind == "deadline" for o in outcomes)),
              "n_error": float(sum(o.kind in ("error", "late") for o in outcomes)),
              "all_returned_after_s": returned - start,
              "first_request_after_s": first.seconds if first.kind == "ok" else float("nan"),
              "pss_before_mb": before}
    if sampler:
        settle_until = time.monotonic() + settle_s
        back_at = None
        while time.monotonic() < settle_until:
            now_mb = float(process_tree_pss(pid)["total_mb"])
            if now_mb <= before + 200 and back_at is None:
                back_at = time.monotonic()
                break
            await asyncio.sleep(0.5)
        sampler.stop()
        result["pss_peak_mb"] = max(mb for _, mb in sampler.samples)
        result["pss_after_mb"] = float(process_tree_pss(pid)["total_mb"])
        result["pss_back_within_200mb_after_s"] = (back_at - returned) if back_at else float("nan")
    return result


async def scenario(args: argparse.Namespace, url: str, pid: Optional[int]) -> Report:
    report = Report(cpu=cpu_model())
    clip = request_inputs(speech_clip(int(args.clip_seconds * SAMPLE_RATE), seed=1))
    client = aioclient.InferenceServerClient(url)
    try:
        await call(client, clip, 120.0)  # warm-up
        report.capacity_rps = await capacity(client, clip, args.capacity_seconds, args.concurrency)
        print(f"capacity (1x, closed loop of {args.concurrency}, {args.clip_seconds:g} s clips): "
              f"{report.capacity_rps:.1f} requests/s", flush=True)
        rate = args.load * report.capacity_rps
        outcomes = await open_loop(client, clip, rate, args.seconds, args.deadline)
        report.open_loop = summarize_open_loop(outcomes, args.seconds, report.capacity_rps, rate)
        o = report.open_loop
        print(f"open loop {args.load:g}x ({rate:.1f}/s for {args.seconds:g} s, {args.deadline:g} s deadlines): "
              f"goodput {o['goodput_rps']:.1f}/s = {100 * o['goodput_vs_capacity']:.0f} % of capacity "
              "(target >= 80 %); "
              f"refused {o['n_busy']:.0f} in p50 {o['refused_p50_ms']:.1f} / p95 {o['refused_p95_ms']:.1f} ms "
              f"(target <= 50 ms); deadline exceeded {o['n_deadline']:.0f}, late {o['n_late']:.0f}, "
              f"errors {o['n_error']:.0f} of {o['sent']:.0f}", flush=True)
        errors = [x.message for x in outcomes if x.kind == "error"][:3]
        if errors:
            print(f"  first errors: {errors}", flush=True)
        if args.burst > 0:
            await asyncio.sleep(2.0)  # let the open loop's last requests drain
            report.burst = b = await burst(client, pid, args.burst, args.burst_clip_seconds, args.burst_deadline, clip,
                                           args.settle_seconds)
            print(f"burst {args.burst} x {args.burst_clip_seconds:g} s, {args.burst_deadline:g} s deadlines: "
                  f"ok {b['n_ok']:.0f}, busy {b['n_busy']:.0f}, deadline {b['n_deadline']:.0f}, "
                  f"errors {b['n_error']:.0f}; all returned after {b['all_returned_after_s']:.1f} s; "
                  f"next {args.clip_seconds:g} s clip answered in {b['first_request_after_s']:.2f} s (target <= 1 s)",
                  flush=True)
            if "pss_peak_mb" in b:
                print(f"  server PSS: {b['pss_before_mb']:.0f} MB before, peak {b['pss_peak_mb']:.0f} MB, "
                      f"back within 200 MB after {b['pss_back_within_200mb_after_s']:.1f} s (target <= 30 s)",
                      flush=True)
    finally:
        await client.close()
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Shedding under overload (make overload).")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--url", help="a running server's gRPC HOST:PORT (default: start one)")
    parser.add_argument("--server-pid", type=int, help="its tritonserver pid, for PSS (with --url)")
    parser.add_argument("--clip-seconds", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop callers for the capacity")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--load", type=float, default=3.0, help="open-loop rate as a multiple of the capacity")
    parser.add_argument("--seconds", type=float, default=60.0, help="open-loop duration")
    parser.add_argument("--deadline", type=float, default=2.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--burst-clip-seconds", type=float, default=60.0)
    parser.add_argument("--burst-deadline", type=float, default=5.0)
    parser.add_argument("--settle-seconds", type=float, default=30.0, help="how long to wait for PSS to come back")
    parser.add_argument("--out", type=Path, default=Path("results/overload"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}", flush=True)
    server = None
    try:
        if args.url:
            url, pid = args.url, args.server_pid
        else:
            options = ServerOptions(model_repository=args.repository.resolve(), grpc_port=free_port(),
                                    http_port=free_port(), metrics_port=free_port(), profile=args.profile,
                                    build_dir=args.out / "triton")
            server = TritonServer(options, log_file=args.out / "tritonserver.log").start()
            url, pid = server.grpc_url, server.process.pid
        report = asyncio.run(scenario(args, url, pid))
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
