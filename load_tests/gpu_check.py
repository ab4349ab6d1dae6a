"""``make gpu-check``: the GPU profile proven end to end in one script, in under 8 minutes.

On a machine with an NVIDIA GPU and a CUDA build of torch in the build environment (``.venv``):

1. builds a model repository (random weights unless ``--mel``/``--encodec`` are given), fp32 and,
   unless ``--no-fp16``, the opt-in fp16-backbone vocoders (``--precision fp16``, SNR-gated);
2. serves it with ``--profile gpu`` (instance groups KIND_GPU), the runtime python being this one;
3. checks every client path (mel, resynthesize mel, resynthesize EnCodec, decode codes) against the
   reference packages run on the same GPU (<= 1e-4, fp32, TF32 off on both sides) and that a batch
   the server forms gives each item what it gives the item alone;
4. runs the bench: concurrency 1..64, 1 s and 10 s mel clips, closed loop, several client processes:
   aggregate real-time factor, p50/p99 latency, GPU memory (nvidia-smi, sampled during each run);
   then the in-process batched throughput of the fp32 and fp16 vocoders (no Triton, no client);
5. writes ``gpu_check.json`` and ``gpu_check.png`` into ``--out``.

Without a usable GPU it exits at once with status 2 and says why. The targets it reports against
(issue 16, H100/H200): in-process batched >= 50,000x, through Triton >= 10,000x aggregate, p99 <= 30 ms
for 1 s clips at half of the peak load.

    python load_tests/gpu_check.py [--out results/gpu-check] [--mel DIR --encodec DIR --encodec-checkpoint PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger("gpu_check")

EXIT_NO_GPU = 2
BUDGET_S = 8 * 60
CONCURRENCIES = (1, 2, 4, 8, 16, 32, 64)
CLIP_SECONDS = (1, 10)
TOLERANCE = 1e-4  # every path vs the reference, fp32
BATCH_TOLERANCE = 1e-5  # an item in a server-formed batch vs the item alone
TARGETS = {"inprocess_rtf": 50_000, "triton_rtf": 10_000, "p99_ms_1s_half_peak": 30}


def gpu_problem() -> Optional[str]:
    """Why this machine cannot run the check (None: it can). Imports torch: call it first."""
    import torch

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} in {sys.prefix} is a CPU-only build; gpu-check needs the CUDA build "
                "(the NGC-compatible torch of `make install`)")
    if not torch.cuda.is_available():
        smi = shutil.which("nvidia-smi")
        return (f"no NVIDIA GPU is usable here (torch {torch.__version__}, CUDA {torch.version.cuda}: "
                f"torch.cuda.is_available() is False; nvidia-smi {'found' if smi else 'not found'}). "
                "Run `make gpu-check` on a machine with an NVIDIA GPU and its driver.")
    return None


def gpu_memory() -> Optional[Dict[str, float]]:
    """Used and total MiB of GPU 0 from nvidia-smi (None without it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    result = subprocess.run([smi, "--query-gpu=memory.used,memory.total,name", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True, timeout=10)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    used, total, name = (part.strip() for part in result.stdout.strip().splitlines()[0].split(",", 2))
    return {"used_mib": float(used), "total_mib": float(total), "name": name}


class MemorySampler:
    """The peak of :func:`gpu_memory` while the ``with`` block runs (sampled every ``period_s``)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.peak_mib: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = gpu_memory()
            if sample is not None:
                self.peak_mib = max(self.peak_mib or 0.0, sample["used_mib"])
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- load generation --------------------------------------------------------------------------------
def _client_loop(url: str, mel: np.ndarray, threads: int, start_at: float, warmup_s: float,
                 duration_s: float) -> List[List[float]]:
    """In a client process: ``threads`` closed loops of one mel request each; (sent, latency) of the
    requests sent after the warm-up and finished before the end."""
    from vocos_client import VocosClient

    measured: List[List[float]] = []
    lock = threading.Lock()
    end = start_at + warmup_s + duration_s

    def loop() -> None:
        with VocosClient(url, timeout=60) as client:
            while time.time() < start_at:
                time.sleep(0.001)
            while True:
                sent = time.time()
                if sent >= end:
                    return
                client.synthesize(mel=mel)
                done = time.time()
                if sent >= start_at + warmup_s and done <= end:
                    with lock:
                        measured.append([sent, done - sent])

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return measured


def split(concurrency: int, processes: int) -> List[int]:
    """``concurrency`` closed loops over at most ``processes`` client processes, as evenly as possible."""
    n = max(1, min(concurrency, processes))
    return [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]


def summarize(latencies_s: Sequence[float], audio_seconds: float, duration_s: float) -> Dict[str, float]:
    """Throughput (audio s per wall s, requests/s) and latency percentiles of one closed-loop run."""
    if not latencies_s:
        return {"requests": 0, "rtf": 0.0, "rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.sort(np.asarray(latencies_s)) * 1000
    return {"requests": len(ms), "rps": len(ms) / duration_s, "rtf": len(ms) * audio_seconds / duration_s,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def half_peak(runs: List[dict]) -> Optional[dict]:
    """The run at the lowest concurrency whose throughput reaches half the peak (the p99 target's load)."""
    if not runs:
        return None
    peak = max(r["rtf"] for r in runs)
    return min((r for r in runs if r["rtf"] >= peak / 2), key=lambda r: r["concurrency"])


def run_load(pool, url: str, mel: np.ndarray, seconds: float, concurrency: int, processes: int,
             warmup_s: float, duration_s: float) -> dict:
    start_at = time.time() + 1.0
    shares = split(concurrency, processes)
    with MemorySampler() as memory:
        results = pool.starmap(_client_loop, [(url, mel, n, start_at, warmup_s, duration_s) for n in shares])
    latencies = [lat for part in results for _, lat in part]
    return {"concurrency": concurrency, "clip_s": seconds, "client_processes": len(shares),
            **summarize(latencies, seconds, duration_s), "gpu_memory_peak_mib": memory.peak_mib}


# -- checks against the reference ------------------------------------------------------------------
@dataclass
class Check:
    name: str
    max_error: float = 0.0
    tolerance: float = TOLERANCE
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance and not self.notes

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "max_error": self.max_error, "tolerance": self.tolerance,
                "notes": self.notes}


def _error(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def check_paths(client, reference_mel, reference_encodec, device) -> List[Check]:
    """Every client path against the reference on ``device``, on speech of three lengths."""
    import torch

    from vocos_triton.contract import BANDWIDTHS, MEL_24KHZ, Bandwidth, Model
    from vocos_triton.speech import speech_clip

    # named after the entry model each client path calls
    mel_path, resynth_mel, resynth_encodec, decode_codes = (
        Model.VOCOS_MEL, Model.RESYNTHESIZE_MEL, Model.RESYNTHESIZE_ENCODEC, Model.DECODE_CODES)
    checks = {name: Check(name) for name in (mel_path, resynth_mel, resynth_encodec, decode_codes)}
    with torch.inference_mode():
        for i, samples in enumerate((MEL_24KHZ.sample_rate, 50_001, 7_777)):
            audio = speech_clip(samples, seed=40 + i)
            x = torch.from_numpy(audio)[None].to(device)
            mel = reference_mel.feature_extractor(x)
            got = client.synthesize(mel=mel[0].cpu().numpy())
            checks[mel_path].max_error = max(checks[mel_path].max_error,
                                             _error(got, reference_mel.decode(mel)[0].cpu().numpy()))
            got = client.synthesize(audio=audio, sample_rate=MEL_24KHZ.sample_rate)
            checks[resynth_mel].max_error = max(checks[resynth_mel].max_error,
                                                _error(got, reference_mel(x)[0].cpu().numpy()))
            bandwidth = BANDWIDTHS[i % len(BANDWIDTHS)]
            bandwidth_id = torch.tensor([Bandwidth.parse(bandwidth).index], device=device)
            extractor = reference_encodec.feature_extractor
            extractor.encodec.set_target_bandwidth(bandwidth)
            got = client.synthesize(audio=audio, sample_rate=MEL_24KHZ.sample_rate, bandwidth=bandwidth)
            expected = reference_encodec(x, bandwidth_id=bandwidth_id)[0].cpu().numpy()
            checks[resynth_encodec].max_error = max(checks[resynth_encodec].max_error, _error(got, expected))
            codes = extractor.get_encodec_codes(x)[:, 0]
            got = client.synthesize(codes=codes.cpu().numpy())
            features = reference_encodec.codes_to_features(codes)
            expected = reference_encodec.decode(features, bandwidth_id=bandwidth_id)[0].cpu().numpy()
            checks[decode_codes].max_error = max(checks[decode_codes].max_error, _error(got, expected))
    return list(checks.values())


def check_batched_equals_solo(client, mels: List[np.ndarray]) -> Check:
    """Items sent together (the server batches them) equal the items sent one by one."""
    check = Check("batched == solo", tolerance=BATCH_TOLERANCE)
    together = client.synthesize_batch(mels, max_concurrency=len(mels))
    for mel, batched in zip(mels, together):
        check.max_error = max(check.max_error, _error(batched, client.synthesize(mel=mel)))
    return check


# -- in-process ------------------------------------------------------------------------------------
def inprocess_throughput(artifact: Path, device, batches: Sequence[int], seconds: int = 10,
                         repeats: int = 5) -> List[dict]:
    """Real-time factor of the TorchScript vocoder called directly on ``device``, per batch size."""
    import torch

    from vocos_triton.contract import MEL_24KHZ

    module = torch.jit.load(str(artifact), map_location=device).eval()
    frames = MEL_24KHZ.frames(seconds * MEL_24KHZ.sample_rate)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            mel = torch.randn(batch, MEL_24KHZ.input_channels, frames, device=device)
            lengths = torch.full((batch,), frames, device=device)
            condition = torch.zeros(batch, dtype=torch.long, device=device)
            times = []
            for i in range(2 + repeats):
                torch.cuda.synchronize(device)
                started = time.perf_counter()
                module(mel, lengths, condition)
                torch.cuda.synchronize(device)
                if i >= 2:
                    times.append(time.perf_counter() - started)
            rows.append({"batch": batch, "clip_s": seconds, "median_s": statistics.median(times),
                         "rtf": batch * seconds / statistics.median(times),
                         "max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20})
    return rows


# -- report ----------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in report["triton"].items():
        c = [r["concurrency"] for r in runs]
        left.plot(c, [r["rtf"] for r in runs], marker="o", label=label)
        right.plot(c, [r["p99_ms"] for r in runs], marker="o", label=f"{label} p99")
        right.plot(c, [r["p50_ms"] for r in runs], marker=".", linestyle="--", label=f"{label} p50")
    left.axhline(TARGETS["triton_rtf"], color="grey", linestyle=":", label="target (Triton)")
    right.axhline(TARGETS["p99_ms_1s_half_peak"], color="grey", linestyle=":", label="p99 target (1 s)")
    for ax, ylabel in ((left, "aggregate real-time factor"), (right, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Vocos on Triton, GPU profile: {report.get('gpu', {}).get('name', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    parser.add_argument("--mel", help="hub id or local dir of the mel Vocos (default: random weights)")
    parser.add_argument("--encodec", help="hub id or local dir of the EnCodec Vocos (default: random weights)")
    parser.add_argument("--encodec-checkpoint", help="encodec_24khz checkpoint file (default: random weights)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16-backbone vocoders")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per load run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each run")
    parser.add_argument("--client-processes", type=int, default=max(1, min(16, (os.cpu_count() or 2) // 2)))
    args = parser.parse_args(argv)
    given = [args.mel, args.encodec, args.encodec_checkpoint]
    if any(given) and not all(given):
        parser.error("real weights need all three of --mel, --encodec and --encodec-checkpoint")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    problem = gpu_problem()
    if problem is not None:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return EXIT_NO_GPU
    return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    from vocos_client import VocosClient
    from vocos_triton.build import checkpoints as ck
    from vocos_triton.build.export import build_repository
    from vocos_triton.build.random_checkpoints import write_all
    from vocos_triton.contract import MEL_24KHZ, Model
    from vocos_triton.launcher.server import ServerOptions, TritonServer, free_port
    from vocos_triton.serving.torchscript import ARTIFACT
    from vocos_triton.speech import speech_clip

    started = time.monotonic()
    # fp32 means fp32 on both sides: TF32 convolutions would differ from the reference by ~1e-3
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", 0)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": gpu_memory() or {"name": torch.cuda.get_device_name(0)}, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "targets": TARGETS}
    if args.mel:
        sources = {"mel": args.mel, "encodec": args.encodec, "checkpoint": args.encodec_checkpoint}
        report["weights"] = sources
    else:
        paths = write_all(args.out / "random-weights", seed=0)
        sources = {"mel": str(paths[Model.VOCOS_MEL]), "encodec": str(paths[Model.VOCOS_ENCODEC]),
                   "checkpoint": str(paths["encodec"])}
        report["weights"] = "random (demo): the check is about the serving path, not the audio"
    mel_ck = ck.load_vocos_checkpoint(sources["mel"], expected_variant="mel")
    encodec_vocos_ck = ck.load_vocos_checkpoint(sources["encodec"], expected_variant="encodec")
    encodec_ck = ck.load_encodec_checkpoint(sources["checkpoint"])
    repository = args.out / "model_repository"
    provenance = build_repository(repository, mel_ck, encodec_vocos_ck, encodec_ck,
                                  random_weights=isinstance(report["weights"], str))
    report["build_s"] = time.monotonic() - started
    fp16_artifact = None
    if not args.no_fp16:
        fp16_repository = args.out / "model_repository_fp16"
        fp16 = build_repository(fp16_repository, mel_ck, None, None, precision="fp16")
        report["fp16_parity"] = fp16[Model.VOCOS_MEL]["parity"]
        fp16_artifact = fp16_repository / Model.VOCOS_MEL / "1" / ARTIFACT
    report["fp32_parity"] = {name: p["parity"] for name, p in provenance.items()}

    reference_mel = ck.build_reference_vocos(mel_ck).to(device).eval()
    reference_encodec = ck.build_reference_vocos(encodec_vocos_ck, encodec_ck).to(device).eval()
    options = ServerOptions(model_repository=repository.resolve(), grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), profile="gpu", build_dir=args.out / "triton",
                            runtime_python=Path(sys.executable))
    context = multiprocessing.get_context("spawn")
    with TritonServer(options, log_file=args.out / "tritonserver.log") as server, \
            VocosClient(server.grpc_url, timeout=120) as client, \
            context.Pool(args.client_processes) as pool:
        report["server_start_s"] = time.monotonic() - started - report["build_s"]
        report["memory_after_start"] = gpu_memory()
        checks = check_paths(client, reference_mel, reference_encodec, device)
        mels = [reference_mel.feature_extractor(torch.from_numpy(speech_clip(n, seed=60 + i))[None].to(device))[0]
                .cpu().numpy() for i, n in enumerate((24_000, 9_000, 40_000, 13_001, 30_000, 2_000, 50_000, 17_000))]
        checks.append(check_batched_equals_solo(client, mels))
        report["checks"] = [c.as_dict() for c in checks]
        for c in checks:
            log.info("check %-22s %s (max error %.3g, tolerance %.0e)%s", c.name, "ok" if c.ok else "FAILED",
                     c.max_error, c.tolerance, f" {c.notes}" if c.notes else "")
        report["triton"] = {}
        for seconds in CLIP_SECONDS:
            audio = torch.from_numpy(speech_clip(seconds * MEL_24KHZ.sample_rate, seed=seconds))[None].to(device)
            mel = reference_mel.feature_extractor(audio)[0].cpu().numpy()
            runs = report["triton"][f"{seconds} s clips"] = []
            for concurrency in CONCURRENCIES:
                left = BUDGET_S - (time.monotonic() - started)
                if left < 60:
                    log.warning("time budget: skipping concurrency %d and above for %d s clips", concurrency, seconds)
                    break
                run = run_load(pool, server.grpc_url, mel, seconds, concurrency, args.client_processes,
                               args.warmup, args.duration)
                runs.append(run)
                log.info("%2d s clips, concurrency %2d: %8.0fx real time, p50 %6.1f ms, p99 %6.1f ms, "
                         "GPU memory %s MiB", seconds, concurrency, run["rtf"], run["p50_ms"], run["p99_ms"],
                         run["gpu_memory_peak_mib"])
        report["memory_after_bench"] = gpu_memory()
    vocoder = repository / Model.VOCOS_MEL / "1" / ARTIFACT
    report["inprocess"] = {"fp32": inprocess_throughput(vocoder, device, (1, 16, 64))}
    if fp16_artifact is not None:
        report["inprocess"]["fp16"] = inprocess_throughput(fp16_artifact, device, (1, 16, 64))
    one_second = report["triton"].get("1 s clips", [])
    at_half = half_peak(one_second)
    report["summary"] = {
        "checks_ok": all(c["ok"] for c in report["checks"]),
        "triton_peak_rtf": max((r["rtf"] for runs in report["triton"].values() for r in runs), default=0.0),
        "inprocess_peak_rtf": max(r["rtf"] for rows in report["inprocess"].values() for r in rows),
        "p99_ms_1s_at_half_peak": at_half["p99_ms"] if at_half else None,
        "half_peak_concurrency": at_half["concurrency"] if at_half else None,
        "elapsed_s": time.monotonic() - started,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "gpu_check.png")
    s = report["summary"]
    print(f"\nGPU {report['gpu'].get('name')}: checks {'ok' if s['checks_ok'] else 'FAILED'}; in-process peak "
          f"{s['inprocess_peak_rtf']:.0f}x (target {TARGETS['inprocess_rtf']}); "
          f"Triton peak {s['triton_peak_rtf']:.0f}x "
          f"(target {TARGETS['triton_rtf']}); p99 of 1 s clips at half peak {s['p99_ms_1s_at_half_peak']} ms "
          f"(target {TARGETS['p99_ms_1s_half_peak']}); {s['elapsed_s']:.0f} s")
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.png'}")
    return 0 if s["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
