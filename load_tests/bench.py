"""Side-by-side benchmark: reference eager ``vocos`` vs our modules in-process vs Triton.

One run, same machine, same weights (the ones ``model_repository/`` was built from, found through
its provenance files). The reference runs here (it needs torchaudio, hence the pinned torch); the
in-process column runs in a worker started with the serving runtime's python (``inprocess_worker.py``),
so that it and the Triton stubs run the modules under the same torch. For both variants (mel: mel ->
waveform; EnCodec: codes -> waveform), 1 s and 10 s clips, batch 1 and 8, it measures throughput
as a real-time factor (audio seconds per wall second), interleaving the systems round by round so
that machine noise hits all of them alike (warm-up rounds, then the median of ``--repeats``).
Triton runs at concurrency 1 (batch 1) and 8 (batch 8: eight concurrent single-item requests that
the server batches), through ``VocosClient``.

With ``--stream`` (``make bench`` passes it) it adds the streaming table (``stream_bench.py``): time to
first audio p50/p95/p99 and real-time factor at concurrency 1, 2, 4, 8 for mel and codes, the offline
``vocos_mel`` side by side and the issue-13 ratios; ``--only-stream`` runs just that table (no reference
models, no in-process worker).

With ``--variants`` (on by default when the repository serves variants: ``vocos_mel__NAME`` /
``vocos_encodec__NAME`` folders) it adds the variant table (``variant_bench.py``): each variant's vocoder
beside the default one at 1 s and 10 s clips of its own sample rate, batch 1, in-process and through
Triton, with its fraction of the matmul roofline and the idle PSS of each variant's stubs (``variants.json``);
``--only-variants`` runs just that table.

It prints the table with the ratios between the columns, the latency Triton + client add to a
1 s clip, the server's memory (PSS over tritonserver and its stubs), optionally the fidelity and speed
of the int8 vocoder (``--int8``), and writes ``bench.json`` + ``bench.png`` into ``--out``.

    python load_tests/bench.py [--repository model_repository] [--repeats 9] [--out results/bench] [--stream]
    python load_tests/bench.py --only-stream [--stream-seconds 10] [--stream-repeats 5]
    python load_tests/bench.py --only-variants [--repository DIR] [--repeats 9] [--out results/bench]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np

from vocos_triton.launcher.server import threading_environment
from vocos_triton.serving.allocator import hold_freed_memory

# The same thread settings as the server's stubs, here and in the in-process worker (it inherits
# them), and the same heap policy (glibc does not trim by itself; the worker sets it too): all three
# systems run under one policy. Set before torch is imported.
os.environ.update(threading_environment(dict(os.environ)))
hold_freed_memory()
import torch  # noqa: E402

from vocos_triton.build import checkpoints as ck  # noqa: E402
from vocos_triton.build.export import ARTIFACT, PROVENANCE  # noqa: E402
from vocos_triton.contract import MEL_24KHZ, Model  # noqa: E402
from vocos_triton.launcher.memory import process_tree_pss  # noqa: E402
from vocos_triton.launcher.runtime import Runtime  # noqa: E402
from vocos_triton.launcher.server import ServerOptions, TritonServer, free_port  # noqa: E402
from vocos_triton.serving.kernels import parse_log  # noqa: E402
from vocos_triton.speech import speech_clip  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stream_bench.py, roofline.py, ...: next to this file
import inprocess_worker  # noqa: E402
import roofline  # noqa: E402
import stream_bench  # noqa: E402
import variant_bench  # noqa: E402

log = logging.getLogger("bench")
BANDWIDTH = 6.0  # 8 codebooks, Bark's fine tokens


@dataclass
class Case:
    variant: str  # "mel" or "encodec"
    seconds: int
    batch: int
    # a callable timed here, or the name of a case of the in-process worker (timed there)
    runners: Dict[str, Union[str, Callable[[], object]]] = field(default_factory=dict)
    times: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def audio_seconds(self) -> float:
        return float(self.seconds * self.batch)

    def rtf(self, system: str) -> float:
        return self.audio_seconds / statistics.median(self.times[system])


def _sources(repository: Path, model: str) -> Dict[str, dict]:
    return json.loads((repository / model / "1" / PROVENANCE).read_text())["sources"]


def load_references(repository: Path):
    """The reference ``vocos.Vocos`` objects built from the checkpoints the repository was built from."""
    mel_source = _sources(repository, Model.VOCOS_MEL)[Model.VOCOS_MEL]["directory"]
    encodec_sources = _sources(repository, Model.VOCOS_ENCODEC)
    reference_mel = ck.build_reference_vocos(ck.load_vocos_checkpoint(mel_source, "mel"))
    reference_encodec = ck.build_reference_vocos(
        ck.load_vocos_checkpoint(encodec_sources[Model.VOCOS_ENCODEC]["directory"], "encodec"),
        ck.load_encodec_checkpoint(encodec_sources["encodec_24khz"]["path"]))
    return reference_mel, reference_encodec


class InProcessWorker:
    """``inprocess_worker.py`` (or ``script``, with the same arguments and protocol: ``variant_bench.py``) in
    the serving runtime; calling ``run(case)`` returns the forward's seconds."""

    def __init__(self, runtime: Runtime, repository: Path, inputs: Dict[str, np.ndarray], threads: int,
                 script: Optional[Path] = None) -> None:
        self._inputs = tempfile.NamedTemporaryFile(suffix=".npz")
        np.savez(self._inputs, **inputs)
        self._inputs.flush()
        script = script or Path(__file__).with_name("inprocess_worker.py")
        self.process = subprocess.Popen(
            [str(runtime.python), str(script), str(repository), self._inputs.name, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.banner = self.process.stdout.readline().strip()
        if not self.banner.startswith("ready"):
            raise RuntimeError(f"in-process worker failed to start ({runtime.python})")

    def run(self, case: str) -> float:
        self.process.stdin.write(f"run {case}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(30)
        self._inputs.close()


def triton_runner(client, items: list, concurrency: int) -> Callable[[], object]:
    """One request for a single item, else ``synthesize_batch`` at ``concurrency`` (bound now, not at call
    time: a lambda in the loop of :func:`build_cases` would see the loop's last batch size)."""
    def as_kwargs(item):
        return item if isinstance(item, dict) else {"mel": item}

    if len(items) == 1:
        return lambda: client.synthesize(**as_kwargs(items[0]))
    return lambda: client.synthesize_batch(items, max_concurrency=concurrency)


def build_cases(reference_mel, reference_encodec, client, seconds_list, batches) -> tuple[List[Case], Dict]:
    """The cases, with their reference and Triton runners, and the in-process inputs by case name."""
    bandwidth_id = torch.tensor([2])
    cases, inprocess_inputs = [], {}
    for seconds in seconds_list:
        audio = torch.from_numpy(speech_clip(seconds * MEL_24KHZ.sample_rate, seed=seconds))[None]
        with torch.inference_mode():
            mel = reference_mel.feature_extractor(audio)  # (1, 100, T)
            reference_encodec.feature_extractor.encodec.set_target_bandwidth(BANDWIDTH)
            codes = reference_encodec.feature_extractor.get_encodec_codes(audio)  # (8, 1, T)
        for batch in batches:
            mels, batch_codes = mel.repeat(batch, 1, 1), codes.repeat(1, batch, 1)
            codes_bkt = batch_codes.transpose(0, 1).contiguous()
            mel_items = [m.numpy() for m in mels]
            code_items = [{"codes": c.numpy(), "bandwidth": BANDWIDTH} for c in codes_bkt]
            mel_case, encodec_case = f"mel-{seconds}s-b{batch}", f"encodec-{seconds}s-b{batch}"
            inprocess_inputs[f"{mel_case}.mel"] = mels.numpy()
            inprocess_inputs[f"{encodec_case}.codes"] = codes_bkt.numpy()
            cases.append(Case("mel", seconds, batch, {
                "reference": lambda m=mels: reference_mel.decode(m),
                "in-process": mel_case,
                "triton": triton_runner(client, mel_items, batch),
            }))
            cases.append(Case("encodec", seconds, batch, {
                "reference": lambda c=batch_codes, b=bandwidth_id: reference_encodec.decode(
                    reference_encodec.codes_to_features(c), bandwidth_id=b),
                "in-process": encodec_case,
                "triton": triton_runner(client, code_items, batch),
            }))
    return cases, inprocess_inputs


def int8_report(repository: Path, reference_mel, repeats: int) -> Dict[str, float]:
    """Fidelity and speed of the opt-in int8 mel vocoder against our fp32 one (10 s, batch 1)."""
    from vocos_triton.build.quantize import fidelity, quantize_vocoder, set_quantized_engine
    from vocos_triton.modules.vocoder import BatchedVocos

    set_quantized_engine()
    fp32 = torch.jit.load(str(repository / Model.VOCOS_MEL / "1" / ARTIFACT)).eval()
    int8 = torch.jit.freeze(torch.jit.script(quantize_vocoder(BatchedVocos(reference_mel).eval())))
    audio = torch.from_numpy(speech_clip(10 * MEL_24KHZ.sample_rate, seed=99))[None]
    times: Dict[str, List[float]] = {"fp32": [], "int8": []}
    with torch.inference_mode():
        mel = reference_mel.feature_extractor(audio)
        args = (mel, torch.tensor([mel.shape[-1]]), torch.zeros(1, dtype=torch.long))
        report = fidelity(fp32(*args), int8(*args))
        for i in range(2 + repeats):
            for name, module in (("fp32", fp32), ("int8", int8)):
                started = time.perf_counter()
                module(*args)
                if i >= 2:
                    times[name].append(time.perf_counter() - started)
    report["speedup"] = statistics.median(times["fp32"]) / statistics.median(times["int8"])
    return report


def print_table(cases: List[Case]) -> List[dict]:
    rows = []
    print(f"\n{'variant':8} {'clip':>5} {'batch':>5} | {'reference':>10} {'in-process':>10} {'triton':>10} |"
          f" {'in-proc/ref':>11} {'triton/in-proc':>14}   (real-time factors: audio s per wall s)")
    for case in cases:
        ref, ours, triton = (case.rtf(s) for s in ("reference", "in-process", "triton"))
        triton_label = f"c={case.batch}"
        print(f"{case.variant:8} {case.seconds:>4}s {case.batch:>5} | {ref:>9.1f}x {ours:>9.1f}x {triton:>9.1f}x |"
              f" {ours / ref:>10.2f}x {triton / ours:>13.2f}x   (triton {triton_label})")
        rows.append({"variant": case.variant, "seconds": case.seconds, "batch": case.batch,
                     "rtf": {"reference": ref, "in-process": ours, "triton": triton},
                     "median_s": {s: statistics.median(t) for s, t in case.times.items()}})
    return rows


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = ["reference", "in-process", "triton"]
    labels = [f"{r['variant']}\n{r['seconds']}s b{r['batch']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 4.5))
    for i, system in enumerate(systems):
        ax.bar(x + (i - 1) * 0.27, [r["rtf"][system] for r in rows], 0.27, label=system)
    ax.set_xticks(x, labels)
    ax.set_ylabel("real-time factor (audio s / wall s)")
    ax.set_title("Vocos: reference eager vs TorchScript in-process vs Triton (CPU, fp32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_streaming(url: str, args: argparse.Namespace) -> dict:
    log.info("streaming table: %.0f s clips, concurrency %s, %d rounds", args.stream_seconds,
             args.stream_concurrency, args.stream_repeats)
    return stream_bench.run(url, seconds=args.stream_seconds, concurrencies=args.stream_concurrency,
                            repeats=args.stream_repeats, log=log.info)


def streaming_only(args: argparse.Namespace) -> int:
    """``--only-stream``: a server, the streaming table, ``stream.json``; nothing else."""
    options = ServerOptions(model_repository=args.repository.resolve(), grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=args.out / "triton")
    with TritonServer(options, log_file=args.out / "tritonserver.log") as server:
        result = run_streaming(server.grpc_url, args)
        result["runtime"] = server.runtime.describe()
    stream_bench.print_report(result)
    print(f"Triton stubs: {result['runtime']}")
    (args.out / "stream.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'stream.json'}")
    return 0


def run_variants(plan: variant_bench.Plan, server: TritonServer, client, memory_idle: dict,
                 args: argparse.Namespace) -> dict:
    """The variant table's measurements on a running server (its in-process worker: ``variant_bench.py``)."""
    def start_worker(inputs: Dict[str, np.ndarray]) -> InProcessWorker:
        return InProcessWorker(server.runtime, args.repository.resolve(), inputs, args.threads,
                               script=variant_bench.WORKER)

    result = variant_bench.run(plan, client, start_worker, args.repeats, memory_idle, log.info)
    result["runtime"] = server.runtime.describe()
    result["reference_torch"] = torch.__version__
    return result


def print_variants(result: dict) -> None:
    variant_bench.print_report(result)
    print(f"in-process worker and Triton stubs: {result['runtime']}; {result['in_process_worker']}")


def variants_only(args: argparse.Namespace) -> int:
    """``--only-variants``: the roofline, a server, the variant table, ``variants.json``; nothing else."""
    from vocos_client import VocosClient

    plan = variant_bench.prepare(args.repository, args.seconds, log.info)  # before the server: the roofline
    options = ServerOptions(model_repository=args.repository.resolve(), grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=args.out / "triton")
    with TritonServer(options, log_file=args.out / "tritonserver.log") as server, \
            VocosClient(server.grpc_url, timeout=120) as client:
        memory_idle = variant_bench.variant_memory(server.process.pid)
        result = run_variants(plan, server, client, memory_idle, args)
    print_variants(result)
    (args.out / "variants.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'variants.json'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seconds", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: all cores)")
    parser.add_argument("--int8", action="store_true", help="also report the opt-in int8 vocoder")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--stream", action="store_true", help="also the streaming table (stream_bench.py)")
    parser.add_argument("--only-stream", action="store_true", help="only the streaming table")
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="clip length of the streaming table")
    parser.add_argument("--stream-repeats", type=int, default=5, help="rounds of the streaming table")
    parser.add_argument("--stream-concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                        help="also the variant table (variant_bench.py; default: when the repository has variants)")
    parser.add_argument("--only-variants", action="store_true", help="only the variant table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from vocos_client import VocosClient

    args.out.mkdir(parents=True, exist_ok=True)
    if args.only_stream:
        return streaming_only(args)
    if args.only_variants:
        return variants_only(args)
    with_variants = bool(variant_bench.variant_models(args.repository)) if args.variants is None else args.variants
    reference_mel, reference_encodec = load_references(args.repository)
    # before the server starts: the roofline needs the cores to itself
    machine = roofline.machine_report({"mel": reference_mel, "encodec": reference_encodec}, MEL_24KHZ.sample_rate)
    roofline.print_machine(machine)
    plan = variant_bench.prepare(args.repository, args.seconds, log.info) if with_variants else None
    options = ServerOptions(model_repository=args.repository.resolve(), grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=args.out / "triton")
    with TritonServer(options, log_file=args.out / "tritonserver.log") as server, \
            VocosClient(server.grpc_url, timeout=120) as client:
        memory_idle = process_tree_pss(server.process.pid)
        variant_memory = variant_bench.variant_memory(server.process.pid) if plan else None
        cases, inputs = build_cases(reference_mel, reference_encodec, client, args.seconds, args.batches)
        worker = InProcessWorker(server.runtime, args.repository.resolve(), inputs, args.threads)
        try:
            log.info("measuring %d cases x 3 systems, %d repeats; reference: torch %s, %d threads; "
                     "in-process and Triton: %s; in-process worker: %s", len(cases), args.repeats,
                     torch.__version__, torch.get_num_threads(), server.runtime.describe(), worker.banner)
            inprocess_worker.round_robin(cases, worker, args.repeats)
        finally:
            worker.close()
        memory_loaded = process_tree_pss(server.process.pid)
        variants = run_variants(plan, server, client, variant_memory, args) if plan else None
        streaming = run_streaming(server.grpc_url, args) if args.stream else None
    rows = print_table(cases)
    systems = ("reference", "in-process", "triton")
    fractions = roofline.roofline_fractions(rows, {v: f["per_audio_second"] for v, f in machine["flops"].items()},
                                            machine["roofline"]["gflops"], systems)
    roofline.print_fractions(fractions, systems)
    slower = [f"{r['variant']} {r['seconds']}s b{r['batch']}" for r in rows
              if r["rtf"]["in-process"] < r["rtf"]["reference"]]
    if slower:
        print(f"WARNING: the serving runtime runs slower than the reference on {', '.join(slower)}: on AVX2-only "
              "CPUs serve with the build environment's torch (docs/hardware.md)")
    kernels = {model: choice.describe() for model, choice in parse_log(server.log_file.read_text()).items()}
    print(f"linear kernels: Triton stubs {kernels}; in-process worker: {worker.banner}")
    one_second = {r["variant"]: r for r in rows if r["seconds"] == 1 and r["batch"] == 1}
    added = {v: 1000 * (r["median_s"]["triton"] - r["median_s"]["in-process"]) for v, r in one_second.items()}
    for variant, ms in added.items():
        print(f"latency added by Triton + client to a 1 s clip ({variant}): {ms:.1f} ms")
    print(f"server memory (PSS, tritonserver + stubs): {memory_idle['total_mb']:.0f} MB after start-up, "
          f"{memory_loaded['total_mb']:.0f} MB after the benchmark")
    for name, mb in sorted(memory_loaded["processes"].items()):
        print(f"  {name:40} {mb:7.0f} MB")
    print(f"reference: torch {torch.__version__}; in-process and Triton stubs: {server.runtime.describe()}")
    report = {"rows": rows, "added_latency_ms": added, "memory": {"idle": memory_idle, "loaded": memory_loaded},
              "torch_threads": torch.get_num_threads(), "reference_torch": torch.__version__,
              "runtime": server.runtime.describe(), "machine": machine, "roofline_fractions": fractions,
              "linear_kernels": {"triton": kernels, "in-process": worker.banner}}
    if args.int8:
        report["int8"] = int8_report(args.repository, reference_mel, args.repeats)
        q = report["int8"]
        print(f"int8 vocoder (opt-in, mel 10 s): {q['speedup']:.2f}x the fp32 speed, "
              f"max abs error {q['max_abs_error']:.3g}, SNR {q['snr_db']:.1f} dB vs fp32")
    if variants is not None:
        report["variants"] = variants
        print_variants(variants)
        (args.out / "variants.json").write_text(json.dumps(variants, indent=2))
    if streaming is not None:
        report["streaming"] = streaming
        stream_bench.print_report(streaming)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(rows, args.out / "bench.png")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
