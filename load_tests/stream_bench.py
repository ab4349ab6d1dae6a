"""The streaming table of ``make bench``: time to first audio and real-time factor by concurrency, with the
offline ``vocos_mel`` measured side by side in the same run.

For mel and EnCodec codes (6 kbps), a clip of ``seconds`` of real speech (espeak-ng; its mel and codes come
from the server's own ``mel_features`` and ``encodec_encoder``, so this needs no torch) is streamed whole
(one request per stream, as ``VocosClient.stream(mel=clip)`` sends it) by 1, 2, 4 and 8 concurrent
streams. Per concurrency: time to first audio (from the call to the first piece the caller gets) p50 / p95 /
p99 over every stream of every round, and the real-time factor of the round (audio seconds of all its
streams per wall second; higher is faster). In the same rounds, interleaved so that machine noise hits
both alike: the offline ``vocos_mel`` on the same clip at concurrency 1 and 8 (latency, p95, throughput),
and 8 paced mel streams: 10-frame chunks sent at twice real time, each chunk's latency measured from its
send to the last audio piece it completes.

The ratios it prints are the targets of issue 13:

* offline latency (c=1) / time to first audio (c=1, p50): >= 7;
* time to first audio p95 (c=8) / offline latency p95 (c=8): <= 25 %;
* streaming throughput (8 whole streams) / offline throughput (c=8): >= 0.8;
* paced chunk -> its audio, p95 over 8 streams: <= 30 ms.

    python load_tests/bench.py --only-stream [--stream-seconds 10] [--stream-repeats 5]
"""
from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import tritonclient.grpc as grpcclient

from vocos_client import VocosClient
from vocos_client._stream import StreamSession
from vocos_triton.contract import (
    ENCODEC_24KHZ,
    ENCODEC_HOP,
    MEL_24KHZ,
    STREAM_MODELS,
    Bandwidth,
    Model,
    Tensor,
)
from vocos_triton.speech import speech_clip

BANDWIDTH = 6.0  # 8 codebooks, Bark's fine tokens
PACED_CHUNK_FRAMES = 10
PACED_SPEED = 2.0
PACED_STREAMS = 8
TARGETS = {"ttfa_speedup": 7.0, "ttfa_p95_share": 0.25, "throughput_ratio": 0.8, "paced_p95_ms": 30.0}


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def clip_inputs(url: str, seconds: float, seed: int = 10) -> Dict[str, Any]:
    """A clip of speech as the server's models see it: its (100, T) mel and its (8, T) codes at 6 kbps."""
    audio = speech_clip(int(seconds * MEL_24KHZ.sample_rate), seed=seed)
    client = grpcclient.InferenceServerClient(url)
    try:
        def infer(model: str, output: str, **tensors: np.ndarray) -> np.ndarray:
            inputs = []
            for name, value in tensors.items():
                value = np.ascontiguousarray(value[None])
                tensor = grpcclient.InferInput(name, list(value.shape), grpcclient.np_to_triton_dtype(value.dtype))
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            return client.infer(model, inputs, client_timeout=120).as_numpy(output)[0]

        mel = infer(Model.MEL_FEATURES, Tensor.MEL, **{Tensor.AUDIO: audio})
        codes = infer(Model.ENCODEC_ENCODER, Tensor.CODES,
                      **{Tensor.AUDIO: audio, Tensor.BANDWIDTH: np.array([BANDWIDTH], np.float32)})
    finally:
        client.close()
    assert codes.shape[0] == Bandwidth.parse(BANDWIDTH).codebooks
    return {"mel": np.ascontiguousarray(mel, np.float32), "codes": np.ascontiguousarray(codes, np.int64),
            "audio_seconds": {"mel": (mel.shape[1] - 1) * MEL_24KHZ.hop_length / MEL_24KHZ.sample_rate,
                              "codes": codes.shape[1] * ENCODEC_HOP / ENCODEC_24KHZ.sample_rate}}


@dataclass
class Series:
    """Measurements of one case over all rounds."""

    ttfa_s: List[float] = field(default_factory=list)  # per stream
    latency_s: List[float] = field(default_factory=list)  # per request or stream: call to its end
    rtf: List[float] = field(default_factory=list)  # per round: audio s of all its items per wall s
    chunk_s: List[float] = field(default_factory=list)  # paced: per chunk that completed audio


def together(count: int, task: Callable[[int], Any], pool: ThreadPoolExecutor) -> tuple:
    """Run ``task(i)`` for i < count at once (a barrier releases them together); (results, wall seconds)."""
    barrier = threading.Barrier(count + 1)

    def run(index: int) -> Any:
        barrier.wait()
        return task(index)

    futures = [pool.submit(run, i) for i in range(count)]
    barrier.wait()
    began = time.perf_counter()
    results = [future.result() for future in futures]
    return results, time.perf_counter() - began


def stream_whole(client: VocosClient, kind: str, clip: np.ndarray) -> tuple:
    """One whole-array stream through the public API: (time to first audio, total time, samples)."""
    began = time.perf_counter()
    first: Optional[float] = None
    samples = 0
    for piece in client.stream(**{kind: clip}):
        if first is None:
            first = time.perf_counter() - began
        samples += piece.shape[0]
    return first, time.perf_counter() - began, samples


def offline(client: VocosClient, clip: np.ndarray) -> tuple:
    began = time.perf_counter()
    audio = client.synthesize(mel=clip)
    return time.perf_counter() - began, audio.shape[0]


def paced_stream(triton: Any, clip: np.ndarray) -> List[float]:
    """One mel stream fed 10-frame chunks at twice real time (a sender thread, as a TTS model would emit
    them); returns, for each chunk that completed audio, its send -> last piece of that audio in seconds."""
    session = StreamSession(triton, STREAM_MODELS["mel"], timeout=120)
    chunks = [np.ascontiguousarray(clip[None, :, s:s + PACED_CHUNK_FRAMES])
              for s in range(0, clip.shape[1], PACED_CHUNK_FRAMES)]
    interval = PACED_CHUNK_FRAMES * MEL_24KHZ.hop_length / MEL_24KHZ.sample_rate / PACED_SPEED
    failed: List[BaseException] = []

    def send() -> None:
        began = time.perf_counter()
        try:
            for index, chunk in enumerate(chunks):
                delay = began + index * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                session.send({Tensor.MEL: chunk}, end=index == len(chunks) - 1)
        except BaseException as exc:  # noqa: BLE001 -- reported by the reading thread
            failed.append(exc)
            session.cancel()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    last_piece: Dict[int, float] = {}
    try:
        for event in session.events():
            if event.piece.size:
                last_piece[event.request] = event.time
    finally:
        session.close()
        sender.join(timeout=60)
    if failed:
        raise failed[0]
    return [last_piece[i] - session.send_times[i] for i in sorted(last_piece)]


def run(url: str, *, seconds: float = 10.0, concurrencies: Sequence[int] = (1, 2, 4, 8), repeats: int = 5,
        warmup: int = 1, log: Callable[[str], None] = print) -> dict:
    """Measure everything, rounds interleaved; returns the report (see :func:`print_report`)."""
    inputs = clip_inputs(url, seconds)
    most = max(max(concurrencies), PACED_STREAMS, 8)
    cases: Dict[str, Series] = {}
    with VocosClient(url, timeout=300) as client, ThreadPoolExecutor(max_workers=most) as pool:
        triton = client._triton()
        for round_index in range(warmup + repeats):
            keep = round_index >= warmup
            for kind in ("mel", "codes"):
                for count in concurrencies:
                    results, wall = together(count, lambda _i, k=kind: stream_whole(client, k, inputs[k]), pool)
                    if keep:
                        series = cases.setdefault(f"stream-{kind}-c{count}", Series())
                        series.ttfa_s += [r[0] for r in results]
                        series.latency_s += [r[1] for r in results]
                        series.rtf.append(count * inputs["audio_seconds"][kind] / wall)
            for count in (1, 8):
                results, wall = together(count, lambda _i: offline(client, inputs["mel"]), pool)
                if keep:
                    series = cases.setdefault(f"offline-mel-c{count}", Series())
                    series.latency_s += [r[0] for r in results]
                    series.rtf.append(count * inputs["audio_seconds"]["mel"] / wall)
            results, _ = together(PACED_STREAMS, lambda _i: paced_stream(triton, inputs["mel"]), pool)
            if keep:
                cases.setdefault("paced-mel", Series()).chunk_s += [x for r in results for x in r]
            log(f"streaming bench: round {round_index + 1} of {warmup + repeats} done"
                + ("" if keep else " (warm-up)"))
    return report(cases, inputs["audio_seconds"], concurrencies, repeats)


def report(cases: Dict[str, Series], audio_seconds: Dict[str, float], concurrencies: Sequence[int],
           repeats: int) -> dict:
    ms = 1000.0
    rows = []
    for kind in ("mel", "codes"):
        for count in concurrencies:
            series = cases[f"stream-{kind}-c{count}"]
            rows.append({"variant": kind, "concurrency": count, "streams": len(series.ttfa_s),
                         "ttfa_ms": {f"p{q}": percentile(series.ttfa_s, q) * ms for q in (50, 95, 99)},
                         "rtf": statistics.median(series.rtf),
                         "stream_ms": {f"p{q}": percentile(series.latency_s, q) * ms for q in (50, 95)}})
    off1, off8 = cases["offline-mel-c1"], cases["offline-mel-c8"]
    offline = {"c1_latency_ms_p50": percentile(off1.latency_s, 50) * ms,
               "c8_latency_ms_p95": percentile(off8.latency_s, 95) * ms,
               "c1_rtf": statistics.median(off1.rtf), "c8_rtf": statistics.median(off8.rtf)}
    by = {(r["variant"], r["concurrency"]): r for r in rows}
    paced = cases["paced-mel"].chunk_s
    ratios: Dict[str, Optional[float]] = {"ttfa_speedup": None, "ttfa_p95_share": None, "throughput_ratio": None}
    if ("mel", 1) in by:
        ratios["ttfa_speedup"] = offline["c1_latency_ms_p50"] / by["mel", 1]["ttfa_ms"]["p50"]
    if ("mel", 8) in by:
        ratios["ttfa_p95_share"] = by["mel", 8]["ttfa_ms"]["p95"] / offline["c8_latency_ms_p95"]
        ratios["throughput_ratio"] = by["mel", 8]["rtf"] / offline["c8_rtf"]
    ratios["paced_p95_ms"] = percentile(paced, 95) * ms
    return {"clip_seconds": audio_seconds, "repeats": repeats, "rows": rows, "offline_mel": offline,
            "paced": {"streams": PACED_STREAMS, "chunk_frames": PACED_CHUNK_FRAMES, "speed": PACED_SPEED,
                      "chunks": len(paced), **{f"p{q}_ms": percentile(paced, q) * ms for q in (50, 95, 99)}},
            "ratios": ratios, "targets": TARGETS}


def _verdict(name: str, value: Optional[float]) -> str:
    if value is None or value != value:
        return "n/a"
    target = TARGETS[name]
    met = value >= target if name in ("ttfa_speedup", "throughput_ratio") else value <= target
    return "meets" if met else "MISSES"


def print_report(result: dict) -> None:
    seconds = result["clip_seconds"]
    print(f"\nStreaming: {seconds['mel']:.1f} s clips (mel; codes {seconds['codes']:.1f} s at {BANDWIDTH:g} kbps), "
          f"each stream one request; {result['repeats']} rounds")
    print(f"{'variant':8} {'conc':>4} | {'TTFA p50':>9} {'p95':>7} {'p99':>7} ms | {'RTF':>7}   "
          "(RTF: audio s of all streams per wall s)")
    for row in result["rows"]:
        t = row["ttfa_ms"]
        print(f"{row['variant']:8} {row['concurrency']:>4} | {t['p50']:>9.1f} {t['p95']:>7.1f} {t['p99']:>7.1f}    |"
              f" {row['rtf']:>6.1f}x")
    off, ratios, paced = result["offline_mel"], result["ratios"], result["paced"]
    print(f"offline vocos_mel, same clip, same run: c=1 latency p50 {off['c1_latency_ms_p50']:.1f} ms; "
          f"c=8 latency p95 {off['c8_latency_ms_p95']:.1f} ms; c=8 throughput {off['c8_rtf']:.1f}x")
    lines = [
        ("ttfa_speedup", "offline latency / TTFA (c=1, p50)", "x", ">= 7x"),
        ("ttfa_p95_share", "TTFA p95 / offline p95 (c=8)", "%", "<= 25%"),
        ("throughput_ratio", "8 whole streams / offline c=8 throughput", "x", ">= 0.8x"),
        ("paced_p95_ms", f"paced ({paced['streams']} streams, {paced['chunk_frames']}-frame chunks at "
                         f"{paced['speed']:g}x real time): chunk -> its audio p95", "ms", "<= 30 ms"),
    ]
    for key, label, unit, target in lines:
        value = ratios[key]
        shown = "n/a" if value is None else (f"{value * 100:.0f}%" if unit == "%" else f"{value:.2f}{unit}")
        print(f"  {label}: {shown} (target {target}: {_verdict(key, value)})")
    print(f"  paced chunk -> its audio: p50 {paced['p50_ms']:.1f} ms, p99 {paced['p99_ms']:.1f} ms over "
          f"{paced['chunks']} chunks")
