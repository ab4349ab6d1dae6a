"""Locust load test for Vocos on Triton: closed-loop gRPC users, one user class per serving path.

Run headless against a running server (``make load-test`` does this for you, with its own server)::

    locust -f load_tests/locustfile.py --headless -u 8 -r 4 -t 60s --host 127.0.0.1:8001 \\
        --paths vocos_mel:2,decode_codes --csv results/run/locust --html results/run/report.html

Each request is reported to Locust as ``request_type="grpc"``, ``name=<path>``, with its latency and
``response_length`` = output samples (so Locust's "Average size" column is samples at 24 kHz). On top
of Locust's statistics, the audio seconds produced per wall second are logged at test stop and written,
with the final per-path latencies, next to the CSV files (``<csv prefix>_summary.json`` and ``.csv``).

Streaming paths (``vocos_mel_stream``, ``decode_codes_stream``; see :class:`StreamUser`) run one sequence
per task over a gRPC stream: ``<model>`` sends the whole clip as one request, ``<model>_paced`` sends it
in 10-frame chunks at twice real time (as a TTS model would emit them), ``<model>_abandoned`` sends paced
chunks and cancels the stream after its first audio piece (a listener who hangs up). Each stream is
reported as ``request_type="stream"`` (whole-stream time, samples), plus its time to first audio
(``"ttfa"``), its largest gap between audio pieces (``"max_gap"``) and, paced, each chunk's latency from
its send to the last response it caused (``"chunk_audio"``), as Locust statistics of their own.

Inputs are real speech (espeak-ng, :func:`vocos_triton.speech.speech_clip`) of 1–15 s, made once at
start-up; the log-mels for ``vocos_mel`` come from the server's own ``mel_features`` model, so this
process needs no torch.
"""
from __future__ import annotations

# Locust has monkey-patched the standard library by the time it imports this file. gRPC's C core
# polls with its own threads unless told to cooperate with gevent; without this call a blocking
# grpc call parks the whole process (every greenlet) until it returns, so "8 users" would send one
# request at a time. It must run before any grpc channel exists, i.e. before tritonclient is used.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import csv  # noqa: E402  (imports after init_gevent on purpose)
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402
from locust.stats import StatsEntry  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from vocos_client._common import balancing_channel_args, grpc_target  # noqa: E402
from vocos_client._stream import Event, StreamSession  # noqa: E402
from vocos_triton.contract import (  # noqa: E402
    BANDWIDTHS,
    CODEBOOK_SIZE,
    CODEBOOKS,
    ENCODEC_24KHZ,
    ENCODEC_HOP,
    ENTRY_MODELS,
    MEL_24KHZ,
    STREAM_MODELS,
    Model,
    Tensor,
)
from vocos_triton.speech import speech_clip  # noqa: E402

log = logging.getLogger("vocos_load_test")

OFFLINE_PATHS = tuple(ENTRY_MODELS.values())
#: The ways a streaming user drives its model (see the module docstring), by path suffix.
STREAM_MODES = {"": "whole", "_paced": "paced", "_abandoned": "abandoned"}
#: Streaming path -> (input kind, mode): vocos_mel_stream, vocos_mel_stream_paced, ...
STREAM_PATHS: Dict[str, Tuple[str, str]] = {
    model + suffix: (kind, mode) for kind, model in STREAM_MODELS.items() for suffix, mode in STREAM_MODES.items()}
PATHS = OFFLINE_PATHS + tuple(STREAM_PATHS)
DEFAULT_PATHS = ",".join(OFFLINE_PATHS)
OUTPUT = Tensor.WAVEFORM
#: Paced streams: chunks of this many frames, sent this many times faster than real time.
PACED_CHUNK_FRAMES = 10
PACED_SPEED = 2.0
#: An abandoning user waits this long before its next stream (its abandoned sequences hold server slots
#: until the server sees the cancellation or drops them idle).
ABANDON_PAUSE_S = 2.0
#: Locust request types: one per path kind, and the streaming statistics of their own.
GRPC, STREAM, TTFA, MAX_GAP, CHUNK_AUDIO = "grpc", "stream", "ttfa", "max_gap", "chunk_audio"


def request_type(path: str) -> str:
    return STREAM if path in STREAM_PATHS else GRPC


class BadResponse(AssertionError):
    """The server answered, but not with the waveform the contract promises (counted as a failure)."""


def strip_host(host: Optional[str]) -> str:
    """``grpc://127.0.0.1:8001/`` -> ``127.0.0.1:8001`` (tritonclient wants ``host:port``).

    Several replicas: ``h1:p1,h2:p2`` or a gRPC target (``dns:///name:port``, ``ipv4:a:p,b:p``) gives
    every user a channel that spreads its requests with gRPC's round_robin, as ``VocosClient`` does.
    """
    if not host:
        raise ValueError("no target: pass --host HOST:PORT (the server's gRPC address, e.g. 127.0.0.1:8001)")
    for prefix in ("grpc://", "grpcs://", "http://", "https://"):
        if host.startswith(prefix):
            host = host[len(prefix):]
            break
    return grpc_target(host.rstrip("/"))


def parse_paths(spec: str) -> Dict[str, float]:
    """``"vocos_mel:3,decode_codes"`` -> ``{"vocos_mel": 3.0, "decode_codes": 1.0}`` (weights per path)."""
    weights: Dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        name = name.strip()
        if name not in PATHS:
            raise ValueError(f"--paths: unknown path {name!r}; expected some of {', '.join(PATHS)}")
        value = float(weight) if weight else 1.0
        if value < 0:
            raise ValueError(f"--paths: weight of {name} must be >= 0, got {value:g}")
        weights[name] = value
    if not any(weights.values()):
        raise ValueError(f"--paths: no path with a positive weight in {spec!r}")
    return weights


def clip_lengths(pool_size: int, min_seconds: float, max_seconds: float, seed: int) -> List[int]:
    """Sample counts spread geometrically over [min, max] s: more short clips than long ones, as in TTS.

    A per-clip random offset keeps lengths off multiples of the hops (256, 320), where trimming bugs hide.
    """
    if pool_size < 1 or not 0 < min_seconds <= max_seconds:
        raise ValueError(f"bad clip pool: size {pool_size}, {min_seconds:g}-{max_seconds:g} s")
    rng = np.random.default_rng(seed)
    seconds = np.geomspace(min_seconds, max_seconds, pool_size)
    lengths = [int(s * MEL_24KHZ.sample_rate) - int(rng.integers(0, 320)) for s in seconds]
    return [max(length, MEL_24KHZ.sample_rate // 2) for length in lengths]


class GeventSafeClient(grpcclient.InferenceServerClient):
    """``InferenceServerClient`` whose ``close`` runs once, while the gevent hub is still running.

    tritonclient's ``__del__`` closes the channel again; when that happens in the garbage collection
    at interpreter exit, gRPC's gevent mode can deadlock (the process never exits: two exits in five
    here). So every client is closed explicitly (``on_stop``, or the ``quit`` event for any left
    open) and the second close is a no-op.
    """

    _open: weakref.WeakSet[GeventSafeClient] = weakref.WeakSet()

    def __init__(self, url: str) -> None:
        self._closed = False
        balancing = balancing_channel_args(url)
        # tritonclient's own defaults (no message size limit), plus round_robin for several replicas
        channel_args = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                        *balancing] if balancing else None
        super().__init__(url, channel_args=channel_args)
        GeventSafeClient._open.add(self)

    def close(self) -> None:
        if self._closed or not hasattr(self, "_channel"):  # closed, or __init__ failed half-way
            return
        self._closed = True
        GeventSafeClient._open.discard(self)
        super().close()

    @classmethod
    def close_all(cls) -> None:
        for client in list(cls._open):
            client.close()


def make_inputs(**tensors: np.ndarray) -> List[grpcclient.InferInput]:
    """``InferInput`` objects with the leading batch dimension of 1 added.

    They are built once and shared by every user: tritonclient only reads them while building a
    request, and reusing them saves the client process a serialisation per request (it shares the
    two cores with the server).
    """
    made = []
    for name, value in tensors.items():
        value = np.ascontiguousarray(value[None])
        tensor = grpcclient.InferInput(name, list(value.shape), grpcclient.np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        made.append(tensor)
    return made


@dataclass(frozen=True)
class PreparedRequest:
    inputs: List[grpcclient.InferInput]
    expected_samples: int


@dataclass(frozen=True)
class StreamInput:
    """One streaming input: its request tensors cut into chunks (whole: one chunk) and the audio it makes."""

    model: str
    chunks: List[Dict[str, np.ndarray]]
    chunk_seconds: List[float]  # audio seconds of each chunk's frames (the pace of a paced stream)
    expected_samples: int


@dataclass
class RequestPool:
    """Ready-to-send requests per path, drawn at random by the users."""

    requests: Dict[str, List[PreparedRequest]] = field(default_factory=dict)
    streams: Dict[str, List[StreamInput]] = field(default_factory=dict)
    input_seconds: List[float] = field(default_factory=list)

    def pick(self, path: str, rng: random.Random) -> PreparedRequest:
        return rng.choice(self.requests[path])

    def pick_stream(self, path: str, rng: random.Random) -> StreamInput:
        return rng.choice(self.streams[path])


def stream_input(kind: str, array: np.ndarray, bandwidth: Optional[np.ndarray], mode: str) -> StreamInput:
    """``array`` (C, T) as the chunk tensors of one stream (batch dimension added)."""
    frames = array.shape[1]
    step = frames if mode == "whole" else PACED_CHUNK_FRAMES
    hop = MEL_24KHZ.hop_length if kind == "mel" else ENCODEC_HOP
    chunks, seconds = [], []
    for start in range(0, frames, step):
        piece = np.ascontiguousarray(array[None, :, start:start + step])
        tensors = {Tensor.MEL: piece} if kind == "mel" else {Tensor.CODES: piece, Tensor.BANDWIDTH: bandwidth[None]}
        chunks.append(tensors)
        seconds.append(piece.shape[2] * hop / MEL_24KHZ.sample_rate)
    expected = MEL_24KHZ.waveform_samples(frames) if kind == "mel" else ENCODEC_24KHZ.waveform_samples(frames)
    return StreamInput(STREAM_MODELS[kind], chunks, seconds, expected)


def build_pool(url: str, paths: Sequence[str], pool_size: int, min_seconds: float, max_seconds: float,
               seed: int, timeout_s: float) -> RequestPool:
    """Speech clips, their log-mels (from the server's ``mel_features``) and the requests of each path."""
    # Synthesise first: espeak-ng runs as a subprocess, and a fork after a gevent-mode grpc channel
    # exists aborts the child (SIGABRT in grpc's fork handler), so no channel may be open yet.
    lengths = clip_lengths(pool_size, min_seconds, max_seconds, seed)
    clips = [speech_clip(length, seed=seed + index) for index, length in enumerate(lengths)]
    client = GeventSafeClient(url)
    try:
        stream_paths = [path for path in paths if path in STREAM_PATHS]
        need_mel = Model.VOCOS_MEL in paths or any(STREAM_PATHS[p][0] == "mel" for p in stream_paths)
        wanted = {p for p in paths if p not in STREAM_PATHS} | {STREAM_MODELS[STREAM_PATHS[p][0]] for p in stream_paths}
        wanted |= {Model.MEL_FEATURES} if need_mel else set()
        for model in sorted(wanted):
            if not client.is_model_ready(model, client_timeout=timeout_s):
                raise RuntimeError(f"{url}: model {model} is not ready (is the repository built and loaded?)")
        rng = np.random.default_rng(seed + 1)
        bandwidth_inputs = {b: np.array([b], dtype=np.float32) for b in BANDWIDTHS}
        pool = RequestPool({path: [] for path in paths if path not in STREAM_PATHS},
                           {path: [] for path in stream_paths})
        for audio in clips:
            length = audio.shape[0]
            pool.input_seconds.append(length / MEL_24KHZ.sample_rate)
            if need_mel:
                result = client.infer(Model.MEL_FEATURES, make_inputs(audio=audio), client_timeout=timeout_s)
                mel = np.ascontiguousarray(result.as_numpy(Tensor.MEL)[0], dtype=np.float32)
                if mel.shape != (100, MEL_24KHZ.frames(length)):
                    raise RuntimeError(f"mel_features returned shape {mel.shape} for {length} samples")
            if Model.VOCOS_MEL in paths:
                pool.requests[Model.VOCOS_MEL].append(
                    PreparedRequest(make_inputs(mel=mel), MEL_24KHZ.waveform_samples(mel.shape[1])))
            for path in stream_paths:
                kind, mode = STREAM_PATHS[path]
                if kind == "mel":
                    pool.streams[path].append(stream_input(kind, mel, None, mode))
                else:  # one bandwidth per clip, in turn: every K is exercised
                    index = len(pool.streams[path]) % len(BANDWIDTHS)
                    codes = rng.integers(0, CODEBOOK_SIZE, size=(CODEBOOKS[index], ENCODEC_24KHZ.frames(length)),
                                         dtype=np.int64)
                    pool.streams[path].append(stream_input(kind, codes, bandwidth_inputs[BANDWIDTHS[index]], mode))
            if Model.RESYNTHESIZE_MEL in paths:
                pool.requests[Model.RESYNTHESIZE_MEL].append(
                    PreparedRequest(make_inputs(audio=audio), MEL_24KHZ.waveform_samples(MEL_24KHZ.frames(length))))
            frames = ENCODEC_24KHZ.frames(length)
            for bandwidth, k in zip(BANDWIDTHS, CODEBOOKS):
                if Model.DECODE_CODES in paths:
                    # Random codes cost the vocoder exactly what real ones do; the values do not matter here.
                    codes = rng.integers(0, CODEBOOK_SIZE, size=(k, frames), dtype=np.int64)
                    pool.requests[Model.DECODE_CODES].append(PreparedRequest(
                        make_inputs(codes=codes, bandwidth=bandwidth_inputs[bandwidth]),
                        ENCODEC_24KHZ.waveform_samples(frames)))
                if Model.RESYNTHESIZE_ENCODEC in paths:
                    pool.requests[Model.RESYNTHESIZE_ENCODEC].append(PreparedRequest(
                        make_inputs(audio=audio, bandwidth=bandwidth_inputs[bandwidth]),
                        ENCODEC_24KHZ.waveform_samples(frames)))
        return pool
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------
# Command-line options (also settable as environment variables, e.g. LOCUST_PATHS=vocos_mel,decode_codes)

@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("Vocos on Triton")
    group.add_argument("--paths", default=DEFAULT_PATHS, env_var="LOCUST_PATHS",
                       help="serving paths to load, optionally weighted: 'vocos_mel:3,decode_codes' "
                            f"(default: the four offline ones, equal weights; all: {', '.join(PATHS)})")
    group.add_argument("--request-timeout", type=float, default=60.0, env_var="LOCUST_REQUEST_TIMEOUT",
                       help="per-request gRPC deadline in seconds; a late answer counts as a failure (default 60)")
    group.add_argument("--think-time", type=float, default=0.0, env_var="LOCUST_THINK_TIME",
                       help="seconds each user waits between requests (default 0: closed loop at saturation)")
    group.add_argument("--retries", type=int, default=0, env_var="LOCUST_RETRIES",
                       help="resend a request that failed UNAVAILABLE (replica gone) up to this many times, "
                            "within its deadline, as VocosClient does; counted in the summary (default 0)")
    group.add_argument("--pool-size", type=int, default=12, env_var="LOCUST_POOL_SIZE",
                       help="number of distinct speech clips (default 12)")
    group.add_argument("--min-seconds", type=float, default=1.0, env_var="LOCUST_MIN_SECONDS",
                       help="shortest clip in seconds (default 1)")
    group.add_argument("--max-seconds", type=float, default=15.0, env_var="LOCUST_MAX_SECONDS",
                       help="longest clip in seconds (default 15)")
    group.add_argument("--pool-seed", type=int, default=0, env_var="LOCUST_POOL_SEED",
                       help="seed of the clips, codes and request order (default 0)")
    group.add_argument("--summary-file", default="", env_var="LOCUST_SUMMARY_FILE",
                       help="path prefix of the final per-path summary with audio seconds per second "
                            "(.json and .csv; default: the --csv prefix + '_summary')")


# ---------------------------------------------------------------------------------------------------
# Users

class _State:
    """What the users share: filled in by the init and test_start listeners."""

    url: str = ""
    paths: Tuple[str, ...] = ()
    pool: Optional[RequestPool] = None
    timeout_s: float = 60.0
    retries: int = 0
    retried = 0  # requests resent after UNAVAILABLE (all users)
    seed: int = 0
    users_started = itertools.count()
    started_at: Optional[float] = None


STATE = _State()


class TritonPathUser(User):
    """One simulated client of one path: a gRPC channel of its own, requests back to back."""

    abstract = True
    path: str = ""

    def wait_time(self) -> float:  # think time is a command-line option, so it is read at run time
        options = self.environment.parsed_options
        return options.think_time if options is not None else 0.0

    def on_start(self) -> None:
        self.client = GeventSafeClient(STATE.url)
        # Per-user streams of choices, reproducible for a given seed and spawn order.
        self.rng = random.Random(STATE.seed * 1_000_003 + next(STATE.users_started))

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        assert STATE.pool is not None, "the request pool is built by the init listener"
        request = STATE.pool.pick(self.path, self.rng)
        exception: Optional[BaseException] = None
        samples = 0
        started = time.perf_counter()
        try:
            result = self.send(request, started)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            waveform = result.as_numpy(OUTPUT)
            if waveform is None or waveform.shape != (1, request.expected_samples):
                shape = None if waveform is None else waveform.shape
                raise BadResponse(f"{self.path}: expected waveform (1, {request.expected_samples}), got {shape}")
            if not np.isfinite(waveform).all():
                raise BadResponse(f"{self.path}: waveform has NaN/Inf")
            samples = request.expected_samples
        except Exception as exc:  # every failure is Locust's to count, never the user greenlet's death
            exception = exc
            elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.environment.events.request.fire(
            request_type="grpc", name=self.path, response_time=elapsed_ms, response_length=samples,
            exception=exception, context={})


    def send(self, request: PreparedRequest, started: float):
        """One inference, resent after ``UNAVAILABLE`` up to ``--retries`` times within the deadline."""
        for attempt in itertools.count():
            remaining = STATE.timeout_s - (time.perf_counter() - started)
            try:
                return self.client.infer(self.path, request.inputs, client_timeout=max(remaining, 1e-3))
            except InferenceServerException as exc:
                delay = 0.1 * 2**attempt
                if (exc.status() != "StatusCode.UNAVAILABLE" or attempt >= STATE.retries
                        or time.perf_counter() - started + delay >= STATE.timeout_s):
                    raise
                STATE.retried += 1
                log.info("%s: %s; retry %d in %.1f s", self.path, exc.message(), attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


class VocosMelUser(TritonPathUser):
    """``vocos_mel``: a (100, T) log-mel in, as an acoustic model would send."""

    path = Model.VOCOS_MEL


class ResynthesizeMelUser(TritonPathUser):
    """``resynthesize_mel``: audio in, mel_features -> vocos_mel."""

    path = Model.RESYNTHESIZE_MEL


class DecodeCodesUser(TritonPathUser):
    """``decode_codes``: (K, T) EnCodec codes + bandwidth in, e.g. Bark fine tokens."""

    path = Model.DECODE_CODES


class ResynthesizeEncodecUser(TritonPathUser):
    """``resynthesize_encodec``: audio + bandwidth in, encodec_encoder -> encodec_embedding -> vocos_encodec."""

    path = Model.RESYNTHESIZE_ENCODEC


class StreamUser(User):
    """One client streaming sequences back to back: ``vocos_mel_stream`` or ``decode_codes_stream``, whole,
    paced or abandoned (the path's suffix). A gRPC channel of its own; each stream is one call on it."""

    abstract = True
    path: str = ""

    wait_time = TritonPathUser.wait_time

    def on_start(self) -> None:
        self.client = GeventSafeClient(STATE.url)
        self.rng = random.Random(STATE.seed * 1_000_003 + next(STATE.users_started))
        self.kind, self.mode = STREAM_PATHS[self.path]

    def on_stop(self) -> None:
        self.client.close()

    def fire(self, kind: str, milliseconds: float, length: int = 0, exception: Optional[BaseException] = None) -> None:
        self.environment.events.request.fire(request_type=kind, name=self.path, response_time=milliseconds,
                                             response_length=length, exception=exception, context={})

    @task
    def stream(self) -> None:
        assert STATE.pool is not None, "the request pool is built by the init listener"
        item = STATE.pool.pick_stream(self.path, self.rng)
        session = StreamSession(self.client, item.model, timeout=STATE.timeout_s)
        feeder = None
        started = time.perf_counter()
        first: Optional[float] = None
        finals: List[float] = []
        samples, largest_gap, last = 0, 0.0, None
        try:
            if self.mode == "whole":
                session.send(item.chunks[0], end=True)
            else:
                feeder = gevent.spawn(self.pace, session, item)
            for event in session.events():
                samples += self.receive(event, finals)
                if event.piece.size:
                    if first is None:
                        first = event.time
                        if self.mode == "abandoned":
                            break
                    elif last is not None:
                        largest_gap = max(largest_gap, event.time - last)
                    last = event.time
            if feeder is not None and self.mode != "abandoned":
                feeder.get()  # re-raises the feeder's exception, if any
            if self.mode != "abandoned" and samples != item.expected_samples:
                raise BadResponse(f"{self.path}: expected {item.expected_samples} samples, got {samples}")
            if first is None:
                raise BadResponse(f"{self.path}: no audio came back")
        except Exception as exc:  # every failure is Locust's to count, never the user greenlet's death
            session.cancel()
            if feeder is not None:
                feeder.kill()
            self.fire(STREAM, (time.perf_counter() - started) * 1000.0, exception=exc)
            return
        finally:
            session.close()  # a complete stream: nothing; an abandoned one: cancelled here
        elapsed = (time.perf_counter() - started) * 1000.0
        if feeder is not None:
            feeder.kill()
        self.fire(STREAM, elapsed, samples)
        self.fire(TTFA, (first - session.send_times[0]) * 1000.0)
        if self.mode != "abandoned":
            self.fire(MAX_GAP, largest_gap * 1000.0)
        if self.mode == "paced":
            for sent, answered in zip(session.send_times, finals):
                self.fire(CHUNK_AUDIO, (answered - sent) * 1000.0)
        if self.mode == "abandoned":
            gevent.sleep(ABANDON_PAUSE_S)

    def receive(self, event: Event, finals: List[float]) -> int:
        if event.final:
            finals.append(event.time)
        if event.piece.size and not np.isfinite(event.piece).all():
            raise BadResponse(f"{self.path}: a waveform piece has NaN/Inf")
        return int(event.piece.size)

    @staticmethod
    def pace(session: StreamSession, item: StreamInput) -> None:
        """Send the chunks as a TTS model running at PACED_SPEED x real time would emit them."""
        began = time.perf_counter()
        due = 0.0
        for index, chunk in enumerate(item.chunks):
            delay = began + due - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            session.send(chunk, end=index == len(item.chunks) - 1)
            due += item.chunk_seconds[index] / PACED_SPEED


def _stream_user(path: str) -> type:
    kind, mode = STREAM_PATHS[path]
    doc = f"``{path}``: {kind} streamed {mode} (see :class:`StreamUser`)."
    name = "".join(part.title() for part in path.split("_")) + "User"
    return type(name, (StreamUser,), {"path": path, "__doc__": doc, "__module__": __name__})


STREAM_USERS = [_stream_user(path) for path in STREAM_PATHS]
globals().update({cls.__name__: cls for cls in STREAM_USERS})  # Locust finds user classes among the module's names

USER_CLASSES = {cls.path: cls for cls in (VocosMelUser, ResynthesizeMelUser, DecodeCodesUser, ResynthesizeEncodecUser,
                                          *STREAM_USERS)}


# ---------------------------------------------------------------------------------------------------
# Lifecycle: build the pool before the clock starts, measure audio throughput, write it out

@events.init.add_listener
def _on_init(environment: Environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:  # Locust used as a library without our options: all paths, defaults
        weights, timeout_s, seed = parse_paths(DEFAULT_PATHS), 60.0, 0
        STATE.retries = 0
        pool_args: Tuple[int, float, float] = (12, 1.0, 15.0)
    else:
        weights, timeout_s, seed = parse_paths(options.paths), options.request_timeout, options.pool_seed
        STATE.retries = max(0, options.retries)
        pool_args = (options.pool_size, options.min_seconds, options.max_seconds)
    # Weights come from --paths; classes the user did not ask for leave the run entirely.
    for path, cls in USER_CLASSES.items():
        cls.weight = weights.get(path, 0.0)
    environment.user_classes[:] = [cls for cls in environment.user_classes if cls.weight > 0]
    if not environment.user_classes:
        raise ValueError("no user class left to run: check --paths and the user classes named on the command line")
    selected = [cls.path for cls in environment.user_classes]
    STATE.url = strip_host(environment.host)
    STATE.paths = tuple(selected)
    STATE.timeout_s = timeout_s
    STATE.seed = seed
    if isinstance(environment.runner, MasterRunner):
        return  # a master only aggregates; its workers send the requests and build their own pools
    # Built here, not in test_start: init runs before the --run-time clock starts, so start-up work
    # (speech synthesis, one mel_features call per clip) does not eat into the measured run.
    began = time.perf_counter()
    STATE.pool = build_pool(STATE.url, selected, *pool_args, seed=seed, timeout_s=timeout_s)
    seconds = STATE.pool.input_seconds
    log.info("request pool ready in %.1f s: %d clips of %.1f-%.1f s (mean %.1f s) for %s at %s",
             time.perf_counter() - began, len(seconds), min(seconds), max(seconds),
             sum(seconds) / len(seconds), ", ".join(selected), STATE.url)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kwargs) -> None:
    STATE.started_at = time.time()


def run_summary(environment: Environment, wall_seconds: float) -> List[dict]:
    """Per path and in total: requests, failures, requests/s, latency percentiles, audio seconds
    produced and audio seconds per wall second.

    Read from Locust's own statistics at test stop (``response_length`` is samples), so the numbers
    are final (Locust's ``_stats.csv`` is rewritten only once a second and can miss the last
    requests) and also hold on a distributed master, whose statistics are the sum of its workers'.
    Rates are over the whole run, ramp-up included.
    """
    # Every selected path gets a row, also one that completed no request (its absence would hide it).
    entries = environment.stats.entries
    selected = [path for path in PATHS if path in STATE.paths or (path, request_type(path)) in entries]
    rows = [_summary_row(path, environment.stats.get(path, request_type(path)), wall_seconds) for path in selected]
    # Locust's own total also counts the streaming statistics (ttfa, max_gap, ...): one per stream, not requests.
    total = StatsEntry(environment.stats, "Aggregated", "", use_response_times_cache=False)
    for path in selected:
        total.extend(environment.stats.get(path, request_type(path)))
    rows.append(_summary_row("Aggregated", total, wall_seconds))
    return rows


def _percentiles(entry) -> Optional[dict]:
    if entry is None or entry.num_requests == 0:
        return None
    return {"count": entry.num_requests, "p50_ms": entry.get_response_time_percentile(0.50),
            "p95_ms": entry.get_response_time_percentile(0.95), "p99_ms": entry.get_response_time_percentile(0.99),
            "max_ms": round(entry.max_response_time or 0, 1)}


def streaming_summary(environment: Environment) -> List[dict]:
    """Per streaming path: time to first audio, largest gap between pieces and (paced) chunk latency."""
    entries = environment.stats.entries
    rows = []
    for path in STREAM_PATHS:
        if path not in STATE.paths and (path, STREAM) not in entries:
            continue
        rows.append({"path": path, "mode": STREAM_PATHS[path][1],
                     **{kind: _percentiles(entries.get((path, kind))) for kind in (TTFA, MAX_GAP, CHUNK_AUDIO)}})
    return rows


def _summary_row(name: str, entry, wall_seconds: float) -> dict:
    audio_seconds = entry.total_content_length / MEL_24KHZ.sample_rate
    per_second = (lambda value: round(value / wall_seconds, 3)) if wall_seconds > 0 else (lambda value: 0.0)
    has_requests = entry.num_requests > 0
    return {
        "path": name,
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": per_second(entry.num_requests),
        "p50_ms": entry.get_response_time_percentile(0.50) if has_requests else 0,
        "p95_ms": entry.get_response_time_percentile(0.95) if has_requests else 0,
        "p99_ms": entry.get_response_time_percentile(0.99) if has_requests else 0,
        "avg_ms": round(entry.avg_response_time, 1),
        "max_ms": round(entry.max_response_time or 0, 1),
        "audio_seconds": round(audio_seconds, 3),
        "audio_s_per_s": per_second(audio_seconds),
        "wall_seconds": round(wall_seconds, 3),
    }


@events.quit.add_listener
def _on_quit(**_kwargs) -> None:
    # Fired after the users have stopped and before interpreter exit (see GeventSafeClient).
    # Not ``quitting``: on SIGTERM that fires while users still have requests in flight.
    GeventSafeClient.close_all()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kwargs) -> None:
    if STATE.started_at is None:
        return
    wall_seconds = time.time() - STATE.started_at
    rows = run_summary(environment, wall_seconds)
    lines = [f"{'path':<22} {'requests':>8} {'failures':>8} {'audio s':>9} {'audio-s/s':>9}"]
    lines += [f"{r['path']:<22} {r['requests']:>8} {r['failures']:>8} {r['audio_seconds']:>9.1f} "
              f"{r['audio_s_per_s']:>9.2f}" for r in rows]
    log.info("audio produced per wall second over %.1f s (%d requests resent after UNAVAILABLE):\n%s",
             wall_seconds, STATE.retried, "\n".join(lines))
    options = environment.parsed_options
    prefix = ""
    if options is not None:
        prefix = options.summary_file or (f"{options.csv_prefix}_summary" if options.csv_prefix else "")
    if prefix:
        target = Path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_name(target.name + ".json").write_text(json.dumps(
            {"wall_seconds": round(wall_seconds, 3), "sample_rate": MEL_24KHZ.sample_rate, "retried": STATE.retried,
             "paths": rows, "streaming": streaming_summary(environment)}, indent=2) + "\n")
        with open(target.with_name(target.name + ".csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
