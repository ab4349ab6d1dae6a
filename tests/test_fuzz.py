"""Malformed requests at random against the session server: it must answer each one and stay healthy.

Seeded, so a failure replays. Each case starts from a valid request for a model (built from the
contract) and breaks it one or more ways: shapes and ranks, dtypes, sizes (up to tens of MB), values
(NaN, Inf, huge, out-of-range codes), missing and extra tensors, a data size that disagrees with the
shape, batch sizes beyond the model's maximum, wrong model names. The streaming models get truncated
streams: abandoned mid-way, END never sent, chunks for sequences that never started, bad chunks inside
good sequences, correlation id 0, whole streams cancelled by their client.

Every answer must be a success or ``INVALID_ARGUMENT``; a model name the server does not serve gets
Triton's ``NOT_FOUND`` ("Request for unknown model"), which the SDK raises as ``ServerError`` (it is no
fault of the request's tensors, and retrying cannot help). The server must stay ready, no stub may die
(the watchdog would hide a crash by reloading the model, so its restarts are checked too), and a valid
request afterwards returns the same audio as before.
"""
from __future__ import annotations

import collections
import queue
import re
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from vocos_triton.contract import BANDWIDTHS, CODEBOOK_SIZE, CODEBOOKS, ENCODEC_24KHZ, MEL_24KHZ, Model, Tensor
from vocos_triton.launcher.watchdog import python_stubs

from triton_helpers import make_inputs

SEED = 14
CASES = 1000
MAX_BATCH = 8
BIG_BYTES = 48 << 20  # the largest payload a case sends (the gRPC limit itself is 2 GB on both ends)

OFFLINE_MODELS = [Model.MEL_FEATURES, Model.VOCOS_MEL, Model.ENCODEC_ENCODER, Model.ENCODEC_EMBEDDING,
                  Model.VOCOS_ENCODEC, Model.RESYNTHESIZE_MEL, Model.RESYNTHESIZE_ENCODEC, Model.DECODE_CODES]
WRONG_NAMES = ["", "vocos", "VOCOS_MEL", "vocos_mel ", "vocos_mel/1", "../vocos_mel", "ensemble", "x" * 300,
               "décode_codes", "mel_features\x00"]
DTYPES = [np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.bool_, np.float32]

Inputs = Dict[str, np.ndarray]


def valid_inputs(model: str, rng: np.random.Generator, frames: int) -> Inputs:
    """A valid batch-of-1 request for ``model`` with about ``frames`` frames (batch axis included)."""
    kbps = float(rng.choice(BANDWIDTHS))
    k = CODEBOOKS[BANDWIDTHS.index(kbps)]
    audio = (0.1 * rng.standard_normal((1, frames * 256 + 513))).astype(np.float32)
    if model in (Model.MEL_FEATURES, Model.RESYNTHESIZE_MEL):
        return {Tensor.AUDIO: audio}
    if model in (Model.ENCODEC_ENCODER, Model.RESYNTHESIZE_ENCODEC):
        return {Tensor.AUDIO: audio, Tensor.BANDWIDTH: np.array([[kbps]], np.float32)}
    if model == Model.VOCOS_MEL:
        return {Tensor.MEL: rng.standard_normal((1, MEL_24KHZ.input_channels, frames + 2)).astype(np.float32)}
    if model in (Model.ENCODEC_EMBEDDING, Model.DECODE_CODES):
        return {Tensor.CODES: rng.integers(0, CODEBOOK_SIZE, (1, k, frames + 1)).astype(np.int64),
                Tensor.BANDWIDTH: np.array([[kbps]], np.float32)}
    if model == Model.VOCOS_ENCODEC:
        return {Tensor.FEATURES: rng.standard_normal((1, ENCODEC_24KHZ.input_channels, frames + 1)).astype(np.float32),
                Tensor.BANDWIDTH_ID: np.array([[k // 4 if k > 2 else 0]], np.int64).clip(0, 3)}
    raise AssertionError(model)


# -- mutations: each takes a valid request and breaks it one way --------------------------------------
def _pick(rng: np.random.Generator, inputs: Inputs) -> str:
    return list(inputs)[int(rng.integers(len(inputs)))]


def wrong_dtype(rng, inputs):
    name = _pick(rng, inputs)
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or 1e30 cast to an integer type: whatever comes
        inputs[name] = inputs[name].astype(dtype) if dtype is not np.bool_ else inputs[name] > 0


def wrong_rank(rng, inputs):
    name = _pick(rng, inputs)
    value = inputs[name]
    if rng.random() < 0.5 and value.ndim > 1:
        inputs[name] = value.reshape(-1)  # rank 1: not even a batch axis
    else:
        inputs[name] = value[..., None].repeat(int(rng.integers(1, 3)), axis=-1)


def wrong_dims(rng, inputs):
    name = _pick(rng, inputs)
    value = inputs[name]
    shape = list(value.shape)
    axis = int(rng.integers(1, len(shape))) if len(shape) > 1 else 0
    shape[axis] = int(rng.choice([0, 1, 2, 3, 7, 80, 99, 101, 127, 129, 256, shape[axis] + 1]))
    inputs[name] = np.resize(value, shape).astype(value.dtype)


def bad_values(rng, inputs):
    name = _pick(rng, inputs)
    value = inputs[name].copy()
    flat = value.reshape(-1)
    if flat.size == 0:
        return
    where = rng.integers(0, flat.size, size=max(1, flat.size // 50))
    if value.dtype.kind == "f":
        with np.errstate(over="ignore"):  # 1e30 in float16 is inf: a value to send like any other
            flat[where] = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 7.0, 0.0, 3.0, 24.0]
                                              ).astype(value.dtype))
    else:
        flat[where] = rng.choice(np.array([-1, CODEBOOK_SIZE, 4, -(2**62), 2**62, 1023], dtype=np.int64)
                                 ).astype(value.dtype)
    inputs[name] = value


def missing_tensor(rng, inputs):
    del inputs[_pick(rng, inputs)]


def extra_tensor(rng, inputs):
    names = ["extra", Tensor.WAVEFORM, Tensor.MEL, Tensor.AUDIO, Tensor.CODES, Tensor.BANDWIDTH, "START", "CORRID"]
    name = names[int(rng.integers(len(names)))]
    inputs[name] = rng.standard_normal((1, int(rng.integers(1, 100)))).astype(np.float32)


def batch_size(rng, inputs):
    size = int(rng.choice([0, 2, MAX_BATCH, MAX_BATCH + 1, 64]))
    first = _pick(rng, inputs)
    for name, value in list(inputs.items()):
        if name == first or rng.random() < 0.7:  # sometimes the inputs disagree on the batch size
            inputs[name] = np.resize(value, (size, *value.shape[1:])).astype(value.dtype)


def huge(rng, inputs):
    name = _pick(rng, inputs)
    value = inputs[name]
    elements = int(np.exp(rng.uniform(np.log(1e5), np.log(BIG_BYTES / max(1, value.itemsize)))))
    rest = int(np.prod(value.shape[1:-1])) if value.ndim > 2 else 1
    inputs[name] = np.zeros((1, *value.shape[1:-1], max(1, elements // rest)), value.dtype) if value.ndim > 1 \
        else np.zeros((elements,), value.dtype)


MUTATIONS: List[Tuple[Callable, float]] = [
    (wrong_dtype, 1.0), (wrong_rank, 1.0), (wrong_dims, 1.5), (bad_values, 1.5), (missing_tensor, 0.7),
    (extra_tensor, 0.7), (batch_size, 0.8), (huge, 0.08),
]


def triton_inputs(inputs: Inputs, rng: np.random.Generator) -> list:
    made = make_inputs(inputs, batch=False)
    if made and rng.random() < 0.03:  # a shape that disagrees with the bytes sent
        tensor = made[int(rng.integers(len(made)))]
        tensor.set_shape([int(d) + 1 for d in tensor.shape()])
    return made


def reference_request(grpc_client) -> np.ndarray:
    rng = np.random.default_rng(0)
    result = grpc_client.infer(Model.RESYNTHESIZE_MEL, make_inputs(valid_inputs(Model.RESYNTHESIZE_MEL, rng, 90),
                                                                   batch=False), client_timeout=120)
    return result.as_numpy(Tensor.WAVEFORM)


def test_fuzzed_requests_never_hurt_the_server(triton, grpc_client):
    before = reference_request(grpc_client)
    stubs = sorted(python_stubs(triton.process.pid).items())
    restarts = list(triton.watchdog.restarts) if triton.watchdog else []
    rng = np.random.default_rng(SEED)
    outcomes: collections.Counter = collections.Counter()
    unexpected = []
    started = time.monotonic()
    weights = np.array([w for _, w in MUTATIONS])
    for case in range(CASES):
        if rng.random() < 0.04:
            model, inputs = WRONG_NAMES[int(rng.integers(len(WRONG_NAMES)))], valid_inputs(Model.VOCOS_MEL, rng, 3)
        else:
            model = OFFLINE_MODELS[int(rng.integers(len(OFFLINE_MODELS)))]
            inputs = valid_inputs(model, rng, int(rng.integers(1, 120)))
            for _ in range(int(rng.integers(1, 3))):
                if not inputs:  # all removed: a request with no tensors is a case too
                    break
                mutate = MUTATIONS[int(rng.choice(len(MUTATIONS), p=weights / weights.sum()))][0]
                mutate(rng, inputs)
        try:
            grpc_client.infer(model, triton_inputs(inputs, rng), client_timeout=120)
            outcomes["success"] += 1
        except InferenceServerException as exc:
            status = exc.status()
            outcomes[status] += 1
            allowed = {"StatusCode.INVALID_ARGUMENT"} | ({"StatusCode.NOT_FOUND"} if model in WRONG_NAMES else set())
            if status not in allowed:
                unexpected.append((case, model, {k: (v.dtype.name, v.shape) for k, v in inputs.items()}, status,
                                   (exc.message() or "")[:200]))
        if case % 100 == 99:
            assert grpc_client.is_server_ready(), f"server not ready after case {case}"
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {CASES} cases in {elapsed:.1f} s: {dict(outcomes)}")
    assert not unexpected, unexpected[:5]
    assert triton.process.poll() is None and grpc_client.is_server_ready()
    assert all(grpc_client.is_model_ready(m) for m in OFFLINE_MODELS)
    assert sorted(python_stubs(triton.process.pid).items()) == stubs, "a stub died (and was replaced)"
    assert (list(triton.watchdog.restarts) if triton.watchdog else []) == restarts
    assert outcomes["StatusCode.INVALID_ARGUMENT"] > CASES // 2 and outcomes["success"] > 0
    after = reference_request(grpc_client)
    assert after.shape == before.shape and np.array_equal(after, before)


# -- truncated and malformed streams ------------------------------------------------------------------
STREAM_CASES = 150
MAX_ABANDONED = 8  # open sequences left without END at once (the models serve 32; other tests need them)
# what a refused chunk's message may say (a stream's errors carry no gRPC status, only the text): the
# contract's "<tensor>: expected ..." or Triton core's checks of the request (its sequence batcher
# refuses a chunk for a sequence that never started, "must specify the START flag", and a batch of
# several chunks, "must specify batch-size 1" / "batch-size must be <= 8"), all
# INVALID_ARG on a plain call; never a stub failure
_STREAM_REFUSAL = re.compile(r"^(?:\[request id: [^\]]*\] )?(?:(?:mel|codes|bandwidth|CORRID): |.*input '|"
                             r".*correlation ID|.*must specify the START flag|.*batch-size|"
                             r".*unexpected (?:inference )?input|.*expected)")


class FuzzStream:
    """One gRPC stream; every answer lands in a queue, as (sequence id, pieces or None, error or None)."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def send(self, model: str, sequence_id: int, start: bool, end: bool, inputs: Inputs) -> None:
        self.client.async_stream_infer(model, make_inputs(inputs, batch=False), request_id=str(sequence_id),
                                       sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                                       enable_empty_final_response=True)

    def finals(self, count: int) -> Tuple[List[np.ndarray], List[str]]:
        """Wait for ``count`` final responses: the pieces and the error messages that came meanwhile."""
        pieces, errors = [], []
        while count:
            result, error = self.answers.get(timeout=120)
            if error is not None:
                errors.append(error.message())
                count -= 1
                continue
            waveform = result.as_numpy(Tensor.WAVEFORM)
            if waveform is not None:
                pieces.append(waveform[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                count -= 1
        return pieces, errors

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def stream_chunk(model: str, rng: np.random.Generator, kbps: float, frames: int) -> Inputs:
    if model == Model.VOCOS_MEL_STREAM:
        return {Tensor.MEL: rng.standard_normal((1, MEL_24KHZ.input_channels, frames)).astype(np.float32)}
    k = CODEBOOKS[BANDWIDTHS.index(kbps)]
    return {Tensor.CODES: rng.integers(0, CODEBOOK_SIZE, (1, k, frames)).astype(np.int64),
            Tensor.BANDWIDTH: np.array([[kbps]], np.float32)}


def bad_chunk(model: str, rng: np.random.Generator, kbps: float) -> Inputs:
    chunk = stream_chunk(model, rng, kbps, int(rng.integers(1, 40)))
    kind = int(rng.integers(5))
    if kind == 0:
        wrong_dtype(rng, chunk)
    elif kind == 1:
        wrong_dims(rng, chunk)
    elif kind == 2:
        bad_values(rng, chunk)
    elif kind == 3:
        batch_size(rng, chunk)
    elif model == Model.DECODE_CODES_STREAM:  # a bandwidth change mid-sequence
        other = float(rng.choice([b for b in BANDWIDTHS if b != kbps]))
        chunk = {**stream_chunk(model, rng, other, 5)}
    else:
        missing_tensor(rng, chunk)
    return chunk


def valid_stream(url: str, rng_seed: int) -> np.ndarray:
    rng = np.random.default_rng(rng_seed)
    mel = rng.standard_normal((1, MEL_24KHZ.input_channels, 90)).astype(np.float32)
    stream = FuzzStream(url)
    try:
        for i, (a, b) in enumerate([(0, 7), (7, 50), (50, 90)]):
            stream.send(Model.VOCOS_MEL_STREAM, 999_000 + rng_seed, i == 0, i == 2, {Tensor.MEL: mel[:, :, a:b]})
        pieces, errors = stream.finals(3)
    finally:
        stream.close()
    assert not errors, errors
    return np.concatenate(pieces)


def test_truncated_and_malformed_streams_never_hurt_the_server(triton, grpc_client):
    """Streams abandoned mid-way, END never sent, chunks for sequences that never started, bad chunks
    inside good sequences, sequence id 0, whole streams cancelled: every answer is a success or a
    refusal naming what was wrong, nothing crashes, and a valid stream afterwards is unchanged."""
    config = grpc_client.get_model_config(Model.VOCOS_MEL_STREAM, as_json=True)["config"]
    idle_s = int(config["sequence_batching"]["max_sequence_idle_microseconds"]) / 1e6
    before = valid_stream(triton.grpc_url, 1)
    stubs = sorted(python_stubs(triton.process.pid).items())
    restarts = list(triton.watchdog.restarts) if triton.watchdog else []
    rng = np.random.default_rng(SEED + 1)
    stream = FuzzStream(triton.grpc_url)
    outcomes: collections.Counter = collections.Counter()
    unexplained: List[str] = []
    abandoned = 0
    next_id = 500_000
    try:
        for case in range(STREAM_CASES):
            model = [Model.VOCOS_MEL_STREAM, Model.DECODE_CODES_STREAM][int(rng.integers(2))]
            kbps = float(rng.choice(BANDWIDTHS))
            next_id += 1
            kind = int(rng.integers(5))
            if kind == 0 and abandoned < MAX_ABANDONED:  # abandoned mid-way: END never sent
                chunks = int(rng.integers(1, 4))
                for i in range(chunks):
                    stream.send(model, next_id, i == 0, False, stream_chunk(model, rng, kbps, int(rng.integers(1, 40))))
                abandoned += 1
                expected_finals = chunks
            elif kind == 1:  # a chunk for a sequence that never started
                stream.send(model, next_id, False, bool(rng.integers(2)), stream_chunk(model, rng, kbps, 5))
                expected_finals = 1
            elif kind == 2:  # a bad chunk inside a good sequence, which then ends normally
                stream.send(model, next_id, True, False, stream_chunk(model, rng, kbps, 5))
                stream.send(model, next_id, False, False, bad_chunk(model, rng, kbps))
                stream.send(model, next_id, False, True, stream_chunk(model, rng, kbps, 5))
                expected_finals = 3
            elif kind == 3:  # correlation id 0 is "no sequence" to Triton
                stream.send(model, 0, True, True, stream_chunk(model, rng, kbps, 5))
                expected_finals = 1
            else:  # a whole sequence in one or two chunks
                stream.send(model, next_id, True, False, stream_chunk(model, rng, kbps, int(rng.integers(1, 20))))
                stream.send(model, next_id, False, True, stream_chunk(model, rng, kbps, int(rng.integers(1, 20))))
                expected_finals = 2
            _, errors = stream.finals(expected_finals)
            outcomes["refused" if errors else "answered"] += 1
            unexplained += [f"case {case}: {e[:200]}" for e in errors if not _STREAM_REFUSAL.match(e)]
        for _ in range(2):  # whole streams cancelled by their client mid-sequence
            doomed = FuzzStream(triton.grpc_url)
            next_id += 1
            doomed.send(Model.VOCOS_MEL_STREAM, next_id, True, False,
                        stream_chunk(Model.VOCOS_MEL_STREAM, rng, 6.0, 200))
            doomed.close(cancel=True)
            abandoned += 1
    finally:
        stream.close()
    print(f"\nstream fuzz: {STREAM_CASES} cases: {dict(outcomes)}, {abandoned} sequences abandoned")
    assert not unexplained, sorted({u.split(": ", 1)[1][:120] for u in unexplained})
    assert outcomes["refused"] > 0 and outcomes["answered"] > 0
    time.sleep(idle_s + 2.5)  # abandoned sequences are dropped after the idle timeout: leave the slots free
    assert triton.process.poll() is None and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(Model.VOCOS_MEL_STREAM) and grpc_client.is_model_ready(Model.DECODE_CODES_STREAM)
    assert sorted(python_stubs(triton.process.pid).items()) == stubs, "a stub died (and was replaced)"
    assert (list(triton.watchdog.restarts) if triton.watchdog else []) == restarts
    after = valid_stream(triton.grpc_url, 1)
    # equal within the streams' exactness (1e-5; where a step's piece ends depends on how chunks queued)
    assert after.shape == before.shape and float(np.abs(after - before).max()) <= 1e-5
