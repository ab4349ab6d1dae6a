"""Streaming synthesis: chunks of mel frames or EnCodec codes in, exact audio pieces out, over one gRPC stream.

The server side (``vocos_mel_stream``, ``decode_codes_stream``) is a pair of decoupled Triton models under
the sequence batcher. One call of :meth:`VocosClient.stream <vocos_client.VocosClient.stream>` is one
sequence on one gRPC bidirectional stream (``ModelStreamInfer``):

* every chunk is one request carrying the sequence id (random, non-zero), ``sequence_start`` on the first
  and ``sequence_end`` on the last; each request is answered by zero or more ``waveform`` pieces and then a
  response flagged final (empty ones included: ``triton_enable_empty_final_response``);
* an error response (it carries a message but no status code, see :func:`stream_error`) is raised as the
  SDK's typed error, and the stream is cancelled;
* cancelling the gRPC call (closing the generator, a timeout, an exception in the producer) is what ends
  the sequence on the server: tritonserver cancels the stream's requests, and the model frees the
  sequence's state when it sees that (a chunk still waiting) or after its idle timeout;
* streams are calls on the client's one channel (HTTP/2 multiplexes them), so a stream costs no
  connection set-up and any number of threads may stream at once through one client.

An input given as an iterable is consumed as it is produced: each chunk is validated (with the contract's
messages and the variant's geometry) and sent at once. Only its last frame is held back until the next
chunk (or the end of the iterable) arrives, because the final request must carry at least one frame and
carry ``sequence_end``; the server's audio lags the input by its lookahead anyway (the streaming model's
``lookahead_frames``, 29 for the charactr checkpoints), so holding one frame back delays a piece by at most
one frame's production time.

``UNAVAILABLE`` before the server has acknowledged the first request (the server is busy: all sequence
slots taken, or not ready) is retried on a new stream with a new sequence id, after the client's
backoff and within the call's deadline; the chunks sent so far are kept until then and resent. Once audio
or a final response came back, every error is raised: the caller may already have played audio.

This module owns the machinery; :mod:`vocos_client._client` and :mod:`vocos_client._aio` add thin
``stream()`` methods. :class:`StreamSession` / :class:`AsyncStreamSession` are the lower level the load
tests and the benchmark use (explicit ``send(..., end=)`` and per-request arrival times).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    Union,
)

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from vocos_triton import contract as c
from vocos_triton.contract import DEFAULT_GEOMETRY, Geometry, Tensor

from ._common import Attempts, Options
from ._errors import (
    INVALID_ARGUMENT,
    UNAVAILABLE,
    ServerError,
    ServerUnavailableError,
    VocosError,
    from_triton,
    tensor_of,
)
from ._inputs import (
    OUTPUT,
    _as_codes,
    _as_mel,
    _bandwidth,
    _bandwidth_tensor,
    _contract,
    _invalid,
    check_served,
    input_kind,
)
from ._variants import geometry_kind, normalize_variant

log = logging.getLogger("vocos_client")

#: Headers of a stream besides the client's own (none: see :func:`stream_error` on ``triton_grpc_error``).
STREAM_HEADERS: Dict[str, str] = {}
#: The models by input kind (``mel``, ``codes``), for the default variant (``variant_model`` names a variant's).
STREAM_MODELS = c.STREAM_MODELS

ChunkSource = Union[np.ndarray, Iterable[Any], AsyncIterable[Any]]

_SENTINEL = object()
#: Seconds a stream may wait for an answer while requests are outstanding before it gives up. The server
#: answers each piece within milliseconds; tritonserver 2.51 never answers the open requests of a
#: stub that died (the watchdog restores the model, but those requests are orphaned), so without this
#: a stream whose stub was killed would wait for ever.
STALL_TIMEOUT_S = 15.0


def new_sequence_id() -> int:
    """A random non-zero sequence id. 63 bits: the request parameter that carries it is an int64."""
    return random.SystemRandom().getrandbits(63) or 1


# ---------------------------------------------------------------------------------------------------
# Chunks: conversion and validation (the contract's functions, so the server's words)

def _frames(array: np.ndarray) -> int:
    return int(array.shape[-1]) if array.ndim else 0


@dataclass
class ChunkChecker:
    """Turns the chunks of one sequence into request tensors, checking each as the server will.

    ``kind`` is ``"mel"`` or ``"codes"``; ``geometry`` the variant's (default: the default variant's of
    that kind) sets the bins and the frame limits. For codes the bandwidth is fixed by ``bandwidth`` or
    else by the first chunk's K; every chunk must then have the same K. ``frames`` counts what was accepted.
    """

    kind: str
    limits: c.Limits
    validate: bool
    bandwidth: Optional[c.Bandwidth] = None
    frames: int = 0
    geometry: Optional[Geometry] = None
    _bandwidth_tensor: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.geometry is None:
            self.geometry = DEFAULT_GEOMETRY[geometry_kind(self.kind, None)]

    @property
    def tensor(self) -> str:
        return Tensor.MEL if self.kind == "mel" else Tensor.CODES

    @property
    def max_frames(self) -> int:
        return self.limits.max_frames(self.geometry)

    @property
    def min_frames(self) -> int:
        """The sequence's minimum length, the offline model's (a centred mel needs 2 frames to make audio)."""
        return self.geometry.min_frames

    def convert(self, chunk: Any) -> np.ndarray:
        """One chunk, (C, T): (C, T) float32 mel or (K, T) integer codes, checked; not yet counted."""
        geometry = self.geometry
        try:
            if self.kind == "mel":
                array = _as_mel(chunk)
                if self.validate:
                    geometry.validate_features(array, c.STREAM_CHUNK_MIN_FRAMES, self.max_frames, Tensor.MEL)
                return array
            array = _as_codes(chunk)
            if self.validate:
                implied = geometry.validate_codes(array, self.bandwidth, c.STREAM_CHUNK_MIN_FRAMES, self.max_frames)
                if self.bandwidth is None:
                    check_served(implied, geometry, Tensor.CODES)
                    self.bandwidth = implied
            elif self.bandwidth is None and array.ndim == 2 and array.shape[0] in c.CODEBOOKS:
                self.bandwidth = c.Bandwidth.for_codebooks(array.shape[0])
            if np.issubdtype(array.dtype, np.integer):
                array = array.astype(np.int64, copy=False)
            return np.ascontiguousarray(array)
        except c.InvalidInput as exc:
            raise _contract(exc) from None

    def count(self, frames: int) -> None:
        """Add ``frames`` to the sequence; the chunk that takes it past the limit is refused."""
        total = self.frames + frames
        if self.validate:
            try:
                c.check_sequence_total(self.tensor, total, self.max_frames, self.limits.max_seconds)
            except c.InvalidInput as exc:
                raise _contract(exc) from None
        self.frames = total

    def check_complete(self, always: bool = False) -> None:
        """At the end of the sequence: it must be as long as the offline model's minimum. ``always``: also
        unvalidated (a stream with no frame at all cannot even be sent)."""
        if self.validate or always:
            try:
                c.check_sequence_end(self.tensor, self.frames, self.min_frames)
            except c.InvalidInput as exc:
                raise _contract(exc) from None

    def tensors(self, array: np.ndarray) -> Dict[str, np.ndarray]:
        """The request tensors of a converted chunk, batch dimension included."""
        if self.kind == "mel":
            return {Tensor.MEL: np.ascontiguousarray(array[None])}
        if self._bandwidth_tensor is None:
            bandwidth = self.bandwidth or c.Bandwidth.from_index(len(c.BANDWIDTHS) - 1)  # unvalidated: server judges
            self._bandwidth_tensor = _bandwidth_tensor(bandwidth)[None]
        return {Tensor.CODES: np.ascontiguousarray(array[None]), Tensor.BANDWIDTH: self._bandwidth_tensor}


@dataclass
class StreamPlan:
    """What ``stream()`` was asked: the model, the checker, and either a whole array's chunks (converted and
    checked) or a source of chunks (checked as they come)."""

    kind: str
    model: str
    checker: ChunkChecker
    chunks: Optional[List[np.ndarray]] = None
    source: Any = None  # an iterable or async iterable of chunks


@dataclass(frozen=True)
class StreamCall:
    """A ``stream()`` call checked at the call level, before its variant's geometry is known: the input kind
    (``mel`` or ``codes``), the input (an array, or an iterable of chunks), the parsed bandwidth, the
    variant's name and the kind of vocoder it needs (``mel`` or ``encodec``)."""

    kind: str
    value: Any
    bandwidth: Optional[c.Bandwidth]
    chunk_frames: Optional[int]
    variant: str

    @property
    def geometry_kind(self) -> str:
        return geometry_kind(self.kind, None)

    @property
    def key(self) -> Tuple[str, str]:
        return self.variant, self.geometry_kind


def _cut(array: np.ndarray, kind: str, chunk_frames: Optional[int]) -> List[np.ndarray]:
    """A whole array in ``chunk_frames`` chunks (one without it): views; a malformed array as one chunk,
    for the checks to describe."""
    layout = _as_mel(array) if kind == "mel" else _as_codes(array)
    if layout.ndim != 2 or layout.shape[1] == 0:
        return [layout]
    step = chunk_frames or layout.shape[1]
    return [layout[:, start:start + step] for start in range(0, layout.shape[1], step)]


def check_call(options: Options, *, mel: Optional[ChunkSource], codes: Optional[ChunkSource], bandwidth: Any,
               chunk_frames: Optional[int], variant: Optional[str] = None) -> StreamCall:
    """What can be checked of a ``stream()`` call without the variant's geometry (no network)."""
    kind = input_kind(mel=mel, codes=codes)
    if chunk_frames is not None and (isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int)
                                     or chunk_frames < c.STREAM_CHUNK_MIN_FRAMES):
        raise ValueError(f"chunk_frames: expected an int >= {c.STREAM_CHUNK_MIN_FRAMES} or None, got {chunk_frames!r}")
    if kind == "mel" and bandwidth is not None:
        raise _invalid(Tensor.BANDWIDTH, "the mel vocoder has no bandwidth; use it with audio= or codes=")
    name = normalize_variant(variant)
    try:
        parsed = _bandwidth(bandwidth, options.validate)
    except c.InvalidInput as exc:
        raise _contract(exc) from None
    value = mel if kind == "mel" else codes
    if not isinstance(value, np.ndarray) and hasattr(value, "__array__"):
        value = np.asarray(value)  # e.g. a CPU torch tensor: a whole array, not an iterable of its rows
    if not isinstance(value, np.ndarray):
        if chunk_frames is not None:
            raise ValueError("chunk_frames applies to a whole array; an iterable is sent chunk by chunk as it comes")
        if isinstance(value, (str, bytes)) or not (hasattr(value, "__iter__") or hasattr(value, "__aiter__")):
            raise _invalid(kind, f"expected a numpy array or an iterable of chunks, got {type(value).__name__}")
    return StreamCall(kind, value, parsed, chunk_frames, name)


def plan_call(options: Options, call: StreamCall, geometry: Optional[Geometry] = None) -> StreamPlan:
    """The plan of a checked call with its variant's geometry (``None``: the default variant's). A whole
    array is checked here in full, chunk by chunk as the server will check it (so its first complaint is
    the server's)."""
    geometry = geometry or DEFAULT_GEOMETRY[call.geometry_kind]
    if options.validate:
        try:
            check_served(call.bandwidth, geometry)
        except c.InvalidInput as exc:
            raise _contract(exc) from None
    checker = ChunkChecker(call.kind, options.limits, options.validate, call.bandwidth, geometry=geometry)
    model = c.variant_model(STREAM_MODELS[call.kind], call.variant)
    stream_plan = StreamPlan(call.kind, model, checker)
    if isinstance(call.value, np.ndarray):
        chunks = []
        for chunk in _cut(call.value, call.kind, call.chunk_frames):
            chunks.append(checker.convert(chunk))
            checker.count(_frames(chunks[-1]))
        checker.check_complete()
        checker.frames = 0  # counted again as the chunks are sent
        stream_plan.chunks = chunks
        return stream_plan
    stream_plan.source = call.value
    return stream_plan


def plan(options: Options, *, mel: Optional[ChunkSource], codes: Optional[ChunkSource], bandwidth: Any,
         chunk_frames: Optional[int], variant: Optional[str] = None,
         geometry: Optional[Geometry] = None) -> StreamPlan:
    """Check the call before anything is sent (:func:`check_call`, then :func:`plan_call` with ``geometry``,
    the variant's: ``None`` is the default variant's)."""
    call = check_call(options, mel=mel, codes=codes, bandwidth=bandwidth, chunk_frames=chunk_frames, variant=variant)
    return plan_call(options, call, geometry)


class HoldBack:
    """Cuts an open-ended series of chunks so that the last request can carry ``sequence_end``.

    Each chunk is passed on at once except for its last frame, which waits for the next chunk (or for
    the end). ``push`` returns the frames to send now (or ``None``); ``finish`` the frames to send with
    ``sequence_end``. ``whole_chunks`` (unvalidated streams, whose chunks may not even be joinable)
    holds back whole chunks instead, so that the server sees each chunk exactly as it was made.
    """

    def __init__(self, whole_chunks: bool = False) -> None:
        self._held: Optional[np.ndarray] = None
        self._whole = whole_chunks

    def push(self, chunk: np.ndarray) -> Optional[np.ndarray]:
        if self._whole:
            ready, self._held = self._held, chunk
            return ready
        ready = chunk[:, :-1]
        if self._held is not None:
            ready = np.concatenate([self._held, ready], axis=1)
        self._held = chunk[:, -1:]
        return ready if ready.shape[1] else None

    def finish(self) -> Optional[np.ndarray]:
        held, self._held = self._held, None
        return held


# ---------------------------------------------------------------------------------------------------
# The protocol of one sequence, transport-agnostic

@dataclass
class Event:
    """One response of a stream: ``request`` (0-based index of the chunk request it answers), ``piece``
    (the audio it carries, float32 (samples,); may be empty) and ``final`` (the request's last response)."""

    request: int
    piece: np.ndarray
    final: bool
    time: float


class Sequence:
    """Builds one sequence's requests and interprets its responses (ordered: pieces of request i, then
    its final response, then request i + 1's)."""

    def __init__(self, model: str, sequence_id: Optional[int] = None) -> None:
        self.model = model
        self.id = sequence_id or new_sequence_id()
        self.sent = 0
        self.finals = 0
        self.ended = False
        self.acknowledged = False  # a response without error came back: no retry from here on

    def request(self, tensors: Dict[str, np.ndarray], end: bool) -> service_pb2.ModelInferRequest:
        if self.ended:
            raise VocosError(f"{self.model}: the sequence has already ended")
        request = service_pb2.ModelInferRequest(model_name=self.model)
        for name, value in tensors.items():
            tensor = request.inputs.add()
            tensor.name = name
            tensor.datatype = np_to_triton_dtype(value.dtype)
            tensor.shape.extend(value.shape)
            request.raw_input_contents.append(value.tobytes())
        request.outputs.add().name = OUTPUT
        request.parameters["sequence_id"].int64_param = self.id
        request.parameters["sequence_start"].bool_param = self.sent == 0
        request.parameters["sequence_end"].bool_param = end
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        self.sent += 1
        self.ended = end
        return request

    @property
    def done(self) -> bool:
        """Every request was sent, the last with ``sequence_end``, and every one has its final response."""
        return self.ended and self.finals == self.sent

    def receive(self, response: service_pb2.ModelStreamInferResponse) -> Event:
        now = time.perf_counter()
        if response.error_message:  # only without triton_grpc_error support: the status is lost
            raise stream_error(response.error_message)
        result = response.infer_response
        piece = _waveform(result, self.model)
        final = result.parameters["triton_final_response"].bool_param if "triton_final_response" in \
            result.parameters else False
        index = self.finals
        if index >= self.sent:
            raise ServerError(f"{self.model}: a response came for request {index} but only {self.sent} were sent")
        self.acknowledged = True
        if final:
            self.finals += 1
        return Event(index, piece, final, now)


_EMPTY = np.zeros(0, np.float32)


def _waveform(result: Any, model: str) -> np.ndarray:
    for index, output in enumerate(result.outputs):
        if output.name != OUTPUT:
            continue
        if output.datatype != "FP32" or len(output.shape) != 2 or output.shape[0] != 1:
            raise ServerError(f"{model}: expected output {OUTPUT!r} FP32 of shape (1, samples), got "
                              f"{output.datatype} {list(output.shape)}")
        if index >= len(result.raw_output_contents):
            return _EMPTY
        return np.frombuffer(result.raw_output_contents[index], dtype=np.float32)
    return _EMPTY


# Words of the in-band messages that mean "try again later" (the server's busy message, a model loading).
# the server busy, or the model restarting after its stub died (tritonserver 2.51's words)
_BUSY_WORDS = ("busy", "unavailable", "not ready", "has no available versions", "is not healthy")
# A request that breaks the sequence protocol: the models' messages about their control inputs, and
# tritonserver's own for a sequence without START.
_SEQUENCE_MISUSE = re.compile(r"^(?:START|END|CORRID): |must specify the START flag")


def stream_error(message: str) -> VocosError:
    """An error response inside the stream, mapped onto the SDK's errors.

    tritonserver puts only the message into a stream's error response, not its status, so the status is
    read back from the words (and kept in ``.status``): the server's "busy" refusal and a model that is
    not ready mean ``UNAVAILABLE``; a message naming a tensor or the sequence means ``INVALID_ARGUMENT``.
    (The ``triton_grpc_error`` header would carry the status, but closing a decoupled model's stream on
    an error while the model still answers earlier requests crashed tritonserver 2.51 with signal 11.)
    """
    text = message.lower()
    if any(word in text for word in _BUSY_WORDS):
        status = UNAVAILABLE
    else:
        stripped = from_triton(InferenceServerException(msg=message)).message
        named = tensor_of(stripped) is not None or _SEQUENCE_MISUSE.search(stripped) is not None
        status = INVALID_ARGUMENT if named else None
    return from_triton(InferenceServerException(msg=message, status=status))


def rpc_error(exc: grpc.RpcError) -> VocosError:
    """A gRPC error that ended the stream, as a typed SDK error.

    Built from ``code()`` and ``details()`` only: tritonclient's ``get_error_grpc`` also reads
    ``debug_error_string()``, which on a locally cancelled sync call waits for ever.
    """
    return from_triton(InferenceServerException(msg=exc.details(), status=str(exc.code())))


# ---------------------------------------------------------------------------------------------------
# Sync transport: one ModelStreamInfer call on the client's channel

class _Requests:
    """The request iterator gRPC's sender thread drains; ``close`` half-closes the stream."""

    def __init__(self) -> None:
        # queue.Queue, not SimpleQueue: gevent (Locust) patches the former's locks, not the C SimpleQueue.
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(_SENTINEL)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _SENTINEL:
            self._queue.put(_SENTINEL)  # a later next() must end too
            raise StopIteration
        return item


class _Session:
    """What the sync and asyncio sessions share: the call's stub and headers, the deadline, the requests
    kept for a retry until the server acknowledges the first one, and per-request send times."""

    def __init__(self, client: Any, model: str, *, attempts: Optional[Attempts] = None,
                 timeout: Optional[float] = None, headers: Optional[Dict[str, str]] = None) -> None:
        self._stub = client._client_stub
        self._metadata = tuple(client._get_metadata({**STREAM_HEADERS, **(headers or {})}))
        self.model = model
        self.attempts = attempts  # None: no retry, ``timeout`` bounds the call
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._unacknowledged: List[Tuple[Dict[str, np.ndarray], bool]] = []
        self._closed = False
        self._call: Any = None
        self.sequence = Sequence(model)
        self.send_times: List[float] = []  # perf_counter() at each send, by request index
        self.stall_timeout_s = STALL_TIMEOUT_S
        self._last_answer = time.perf_counter()
        self._stalled = False

    def _answered(self) -> None:
        self._last_answer = time.perf_counter()

    def _stalled_for(self) -> float:
        """Seconds the stream has waited for an answer while a request was outstanding (0: none is)."""
        if self.sequence.finals >= self.sequence.sent or not self.send_times:
            return 0.0
        oldest = self.send_times[min(self.sequence.finals, len(self.send_times) - 1)]
        return time.perf_counter() - max(self._last_answer, oldest)

    def _stall_error(self) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"{self.model}: no answer for {self.stall_timeout_s:g} s while {self.sequence.sent - self.sequence.finals}"
            " request(s) were waiting: the model's stub may have died (the server restores it); the stream is "
            "cancelled, start a new one")

    def _remaining(self) -> Optional[float]:
        if self.attempts is not None:
            return self.attempts.remaining()
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 1e-3)

    def _may_retry(self, error: VocosError) -> bool:
        return (self.attempts is not None and isinstance(error, ServerUnavailableError)
                and not self.sequence.acknowledged and not self._closed)


class StreamSession(_Session):
    """One streamed sequence on a sync ``tritonclient.grpc`` client (its channel, stub and headers).

    ``send(tensors, end=)`` may be called from another thread than the one reading :meth:`events`;
    :meth:`cancel` ends the call (and so the sequence on the server). Retries ``UNAVAILABLE`` until the
    server acknowledges the first request (see the module docstring).
    """

    def __init__(self, client: Any, model: str, *, attempts: Optional[Attempts] = None,
                 timeout: Optional[float] = None, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(client, model, attempts=attempts, timeout=timeout, headers=headers)
        self._lock = threading.Lock()
        self._opened = threading.Event()  # set by the first send (or a cancel)

    def _open(self) -> None:
        """A new call for a new sequence (lock held); the call starts with the first chunk, not before, so
        that a producer that fails at once (or a stream that has nothing to send) costs no request."""
        self.sequence = Sequence(self.model)
        self._requests = _Requests()
        self._call = self._stub.ModelStreamInfer(self._requests, metadata=self._metadata,
                                                 timeout=self._remaining())
        self._opened.set()

    def send(self, tensors: Dict[str, np.ndarray], end: bool = False) -> None:
        with self._lock:
            if self._closed:
                raise VocosError(f"{self.model}: the stream is closed")
            if self._call is None:
                self._open()
            if not self.sequence.acknowledged:
                self._unacknowledged.append((tensors, end))
            self.send_times.append(time.perf_counter())
            self._requests.put(self.sequence.request(tensors, end))
            if end:
                self._requests.close()

    def _watch_stall(self) -> None:
        """Cancel the call when it has waited :attr:`stall_timeout_s` for an answer (see STALL_TIMEOUT_S)."""
        while not self._closed and not self.sequence.done:
            if self._stalled_for() > self.stall_timeout_s:
                self._stalled = True
                if self._call is not None:
                    self._call.cancel()
                return
            time.sleep(0.25)

    def events(self) -> Iterator[Event]:
        """The stream's responses in order, until the last request's final response."""
        self._opened.wait()
        if self._call is None:
            raise VocosError(f"{self.model}: the stream was cancelled before it started")
        threading.Thread(target=self._watch_stall, name="vocos-stream-stall", daemon=True).start()
        while not self.sequence.done:
            try:
                response = next(self._call)
                self._answered()
            except StopIteration:
                if self.sequence.done:
                    return
                raise ServerError(f"{self.model}: the server ended the stream after {self.sequence.finals} of "
                                  f"{self.sequence.sent} requests were answered") from None
            except grpc.RpcError as exc:
                if self._stalled:
                    raise self._stall_error() from None
                error = rpc_error(exc)
                if self._retry(error):
                    continue
                raise error from None
            try:
                event = self.sequence.receive(response)
            except VocosError as error:
                if self._retry(error):
                    continue
                raise
            if self.sequence.acknowledged and self._unacknowledged:
                with self._lock:
                    self._unacknowledged.clear()
            yield event
        # Every request is answered and the stream half-closed: the server ends the call with its status
        # next. Reading it (instead of dropping the call, which cancels it) ends the call cleanly.
        try:
            for _ in self._call:
                log.debug("%s: response after the last final one ignored", self.model)
        except grpc.RpcError as exc:
            log.debug("%s: stream ended after its last response with %s", self.model, rpc_error(exc))

    def _retry(self, error: VocosError) -> bool:
        """After ``UNAVAILABLE`` before the first acknowledgement: wait, reopen, resend; else ``False``."""
        if not self._may_retry(error):
            return False
        assert self.attempts is not None
        delay = self.attempts.next_delay(error)
        if delay is None:
            raise self.attempts.give_up(error) from error
        self._call.cancel()
        time.sleep(delay)
        with self._lock:
            if self._closed:
                return False
            self._open()
            for tensors, end in self._unacknowledged:
                self._requests.put(self.sequence.request(tensors, end))
                if end:
                    self._requests.close()
        return True

    def cancel(self) -> None:
        """End the call: the server cancels the sequence's requests and frees its state."""
        with self._lock:
            self._closed = True
            if self._call is not None:
                self._requests.close()
                self._call.cancel()
            self._opened.set()

    def close(self) -> None:
        """After a complete stream: nothing to cancel; else the same as :meth:`cancel`."""
        if self._call is not None and self.sequence.done:
            with self._lock:
                self._closed = True
                self._requests.close()
        else:
            self.cancel()


class _Feeder(threading.Thread):
    """Pulls chunks from the caller's iterable (in this thread, so that a slow producer and the reading of
    pieces overlap), checks them and sends them; records the first exception and cancels the stream."""

    def __init__(self, session: StreamSession, plan: StreamPlan) -> None:
        super().__init__(name="vocos-stream-feeder", daemon=True)
        self.session = session
        self.plan = plan
        self.error: Optional[BaseException] = None
        self.stopping = threading.Event()

    def run(self) -> None:
        source = iter(self.plan.source)
        try:
            for chunk_request, end in _open_ended(self.plan.checker, source, self.stopping.is_set):
                if self.stopping.is_set():
                    return
                self.session.send(chunk_request, end)
        except BaseException as exc:  # noqa: BLE001 -- handed to the reading thread, which raises it
            if not self.stopping.is_set():
                self.error = exc
                self.session.cancel()
        finally:
            if self.stopping.is_set():
                close = getattr(source, "close", None)
                if close is not None:
                    close()


def _open_ended(checker: ChunkChecker, source: Iterator[Any],
                stopping: Callable[[], bool]) -> Iterator[Tuple[Dict[str, np.ndarray], bool]]:
    """(tensors, end) requests for the chunks of an iterable, the last frame held back each time."""
    hold = HoldBack(whole_chunks=not checker.validate)
    for chunk in source:
        if stopping():
            return
        array = checker.convert(chunk)
        checker.count(_frames(array))
        ready = hold.push(array)
        if ready is not None:
            yield checker.tensors(ready), False
    checker.check_complete()
    last = hold.finish()
    if last is None:
        checker.check_complete(always=True)
    yield checker.tensors(last), True


def stream(client: Any, options: Options, plan: StreamPlan, timeout: Optional[float]) -> Iterator[np.ndarray]:
    """The generator behind :meth:`VocosClient.stream`: float32 pieces in order."""
    session = StreamSession(client, plan.model, attempts=Attempts(options, timeout, plan.model),
                            headers=options.headers())
    feeder: Optional[_Feeder] = None
    try:
        if plan.chunks is not None:
            chunks = plan.chunks
            for index, chunk in enumerate(chunks):
                plan.checker.count(_frames(chunk))
                session.send(plan.checker.tensors(chunk), end=index == len(chunks) - 1)
        else:
            feeder = _Feeder(session, plan)
            feeder.start()
        try:
            for event in session.events():
                if event.piece.size:
                    yield event.piece
        except VocosError:
            if feeder is not None and feeder.error is not None:
                raise feeder.error from None
            raise
        if feeder is not None:
            feeder.join()
            if feeder.error is not None:
                raise feeder.error
    finally:
        if feeder is not None and feeder.is_alive():
            feeder.stopping.set()
        session.close()


# ---------------------------------------------------------------------------------------------------
# asyncio transport

class AsyncStreamSession(_Session):
    """The asyncio twin of :class:`StreamSession` on a ``tritonclient.grpc.aio`` client."""

    def __init__(self, client: Any, model: str, *, attempts: Optional[Attempts] = None,
                 timeout: Optional[float] = None, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(client, model, attempts=attempts, timeout=timeout, headers=headers)
        self._lock = asyncio.Lock()
        self._opened = asyncio.Event()

    def _open(self) -> None:
        self.sequence = Sequence(self.model)
        self._call = self._stub.ModelStreamInfer(metadata=self._metadata, timeout=self._remaining())
        self._opened.set()

    async def send(self, tensors: Dict[str, np.ndarray], end: bool = False) -> None:
        async with self._lock:
            if self._closed:
                raise VocosError(f"{self.model}: the stream is closed")
            if self._call is None:
                self._open()
            if not self.sequence.acknowledged:
                self._unacknowledged.append((tensors, end))
            self.send_times.append(time.perf_counter())
            await self._write(self.sequence.request(tensors, end), end)

    async def _write(self, request: Any, end: bool) -> None:
        try:
            await self._call.write(request)
            if end:
                await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call has ended (an error the reader reports): nothing more to send

    async def events(self) -> AsyncIterator[Event]:
        await self._opened.wait()
        if self._call is None:
            raise VocosError(f"{self.model}: the stream was cancelled before it started")
        while not self.sequence.done:
            try:
                response = await self._read()
            except grpc.RpcError as exc:
                error = rpc_error(exc)
                if await self._retry(error):
                    continue
                raise error from None
            if response is grpc.aio.EOF:
                raise ServerError(f"{self.model}: the server ended the stream after {self.sequence.finals} of "
                                  f"{self.sequence.sent} requests were answered")
            try:
                event = self.sequence.receive(response)
            except VocosError as error:
                if await self._retry(error):
                    continue
                raise
            if self.sequence.acknowledged and self._unacknowledged:
                self._unacknowledged.clear()
            yield event
        try:  # see StreamSession.events
            while await self._call.read() is not grpc.aio.EOF:
                log.debug("%s: response after the last final one ignored", self.model)
        except grpc.RpcError as exc:
            log.debug("%s: stream ended after its last response with %s", self.model, rpc_error(exc))

    async def _read(self) -> Any:
        """The next response; gives up (cancelling the call) after :attr:`stall_timeout_s` without an
        answer while a request is outstanding. The read itself is never cancelled while waiting."""
        reading = asyncio.ensure_future(self._call.read())
        while True:
            done, _ = await asyncio.wait({reading}, timeout=0.25)
            if done:
                self._answered()
                return reading.result()
            if self._stalled_for() > self.stall_timeout_s:
                self._call.cancel()
                reading.cancel()
                raise self._stall_error()

    async def _retry(self, error: VocosError) -> bool:
        if not self._may_retry(error):
            return False
        assert self.attempts is not None
        delay = self.attempts.next_delay(error)
        if delay is None:
            raise self.attempts.give_up(error) from error
        self._call.cancel()
        await asyncio.sleep(delay)
        async with self._lock:
            if self._closed:
                return False
            self._open()
            for tensors, end in self._unacknowledged:
                await self._write(self.sequence.request(tensors, end), end)
        return True

    def cancel(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._opened.set()

    def close(self) -> None:
        if self._call is None or not self.sequence.done:
            self.cancel()
        self._closed = True


async def _aiter_chunks(source: Any) -> AsyncIterator[Any]:
    if hasattr(source, "__aiter__"):
        async for chunk in source:
            yield chunk
    else:
        for chunk in source:
            yield chunk


async def _feed(session: AsyncStreamSession, plan: StreamPlan) -> None:
    checker = plan.checker
    hold = HoldBack(whole_chunks=not checker.validate)
    source = _aiter_chunks(plan.source)
    try:
        async for chunk in source:
            array = checker.convert(chunk)
            checker.count(_frames(array))
            ready = hold.push(array)
            if ready is not None:
                await session.send(checker.tensors(ready), False)
        checker.check_complete()
        last = hold.finish()
        if last is None:
            checker.check_complete(always=True)
        await session.send(checker.tensors(last), True)
    finally:
        await source.aclose()


async def astream(client: Callable[[], Any], options: Options, plan: StreamPlan,
                  timeout: Optional[float]) -> AsyncIterator[np.ndarray]:
    """The async generator behind :meth:`AsyncVocosClient.stream`; ``client()`` gives the aio client (its
    channel is made in the running loop, on first use)."""
    session = AsyncStreamSession(client(), plan.model, attempts=Attempts(options, timeout, plan.model),
                                 headers=options.headers())
    feeder: Optional[asyncio.Task] = None
    try:
        if plan.chunks is not None:
            chunks = plan.chunks
            for index, chunk in enumerate(chunks):
                plan.checker.count(_frames(chunk))
                await session.send(plan.checker.tensors(chunk), end=index == len(chunks) - 1)
        else:
            feeder = asyncio.ensure_future(_feed(session, plan))

            def stop_on_error(task: asyncio.Task) -> None:
                if not task.cancelled() and task.exception() is not None:
                    session.cancel()

            feeder.add_done_callback(stop_on_error)
        try:
            async for event in session.events():
                if event.piece.size:
                    yield event.piece
        except (VocosError, asyncio.CancelledError):
            if feeder is not None and feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
                raise feeder.exception() from None
            raise
        if feeder is not None:
            await feeder
    finally:
        session.close()
        if feeder is not None and not feeder.done():
            feeder.cancel()
            try:
                await feeder
            except BaseException:  # noqa: BLE001 -- its outcome no longer matters
                pass
