"""What the gRPC guard costs: the same calls through the guard and straight to tritonserver, side by side.

Starts one server (with the guard) and alternates rounds of identical calls to its public port (the
guard) and to tritonserver's own loopback gRPC port behind it, so both see the same server, load and
machine. Prints latency at concurrency 1 and throughput at concurrency 8, and their ratios.

    python load_tests/guard_overhead.py [--repository model_repository] [--rounds 3] [--out results/guard]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import tritonclient.grpc as grpcclient

from vocos_triton.contract import MEL_24KHZ, Model, Tensor
from vocos_triton.launcher.guard_process import GUARD_UPSTREAM_HOST
from vocos_triton.launcher.server import ServerOptions, TritonServer, free_port
from vocos_triton.speech import speech_clip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import cpu_model  # noqa: E402


def inputs(audio: np.ndarray) -> list:
    tensor = grpcclient.InferInput(Tensor.AUDIO, [1, audio.shape[0]], "FP32")
    tensor.set_data_from_numpy(audio[None])
    return [tensor]


def latencies(url: str, request: list, calls: int) -> List[float]:
    """Seconds of ``calls`` sequential calls to resynthesize_mel."""
    client = grpcclient.InferenceServerClient(url)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.infer(Model.RESYNTHESIZE_MEL, request, client_timeout=120)
        times.append(time.perf_counter() - start)
    client.close()
    return times


def throughput(url: str, request: list, audio_seconds: float, concurrency: int, calls: int) -> float:
    """Audio seconds per second of ``calls`` calls from ``concurrency`` callers."""
    clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]

    def run(index: int) -> None:
        clients[index % concurrency].infer(Model.RESYNTHESIZE_MEL, request, client_timeout=300)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, range(calls)))
    elapsed = time.perf_counter() - start
    for client in clients:
        client.close()
    return calls * audio_seconds / elapsed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/guard"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    short, long = speech_clip(MEL_24KHZ.sample_rate, seed=1), speech_clip(10 * MEL_24KHZ.sample_rate, seed=2)
    options = ServerOptions(model_repository=args.repository.resolve(), grpc_port=free_port(),
                            http_port=free_port(), metrics_port=free_port(), build_dir=args.out / "triton")
    results: Dict[str, Dict[str, List[float]]] = {"guard": {}, "direct": {}}
    with TritonServer(options, log_file=args.out / "tritonserver.log") as server:
        urls = {"guard": server.grpc_url, "direct": f"{GUARD_UPSTREAM_HOST}:{server.upstream_grpc_port}"}
        short_request, long_request = inputs(short), inputs(long)
        for url in urls.values():
            latencies(url, short_request, 5)  # warm-up
        for _ in range(args.rounds):
            for route, url in urls.items():
                row = results[route]
                row.setdefault("c1_1s_ms", []).append(statistics.median(latencies(url, short_request, 30)) * 1000)
                row.setdefault("c8_10s_rtf", []).append(throughput(url, long_request, 10.0, 8, 24))
    print(f"CPU: {cpu_model()}")
    summary = {route: {key: statistics.median(values) for key, values in row.items()} for route, row in results.items()}
    g, d = summary["guard"], summary["direct"]
    print(f"resynthesize_mel, medians of {args.rounds} alternating rounds:")
    print(f"  1 s clip, one caller:   guard {g['c1_1s_ms']:.1f} ms, direct {d['c1_1s_ms']:.1f} ms "
          f"(+{g['c1_1s_ms'] - d['c1_1s_ms']:.1f} ms, ratio {g['c1_1s_ms'] / d['c1_1s_ms']:.3f})")
    print(f"  10 s clips, 8 callers:  guard {g['c8_10s_rtf']:.1f}x, direct {d['c8_10s_rtf']:.1f}x real time "
          f"(ratio {g['c8_10s_rtf'] / d['c8_10s_rtf']:.3f})")
    (args.out / "guard_overhead.json").write_text(json.dumps({"cpu": cpu_model(), "rounds": results,
                                                               "medians": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
