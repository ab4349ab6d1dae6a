"""``VocosClient.stream`` / ``AsyncVocosClient.stream`` against the real tritonserver (the session ``triton``).

Exactness against ``synthesize`` on the same input, lazy consumption of a producer, cancellation, the
busy-server retry at the start of a stream, and local checks that say what the server says.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List

import numpy as np
import pytest

from vocos_client import (
    AsyncVocosClient,
    DeadlineExceededError,
    InvalidInputError,
    ServerUnavailableError,
    VocosClient,
)
from vocos_triton.contract import Model

import reference_outputs as ref

EXACT = 1e-5


@pytest.fixture(scope="module")
def mel(reference_mel, speech_3s) -> np.ndarray:
    """(100, T) log-mel of 3 s of speech: what an acoustic model would emit."""
    return ref.mel_features(reference_mel, speech_3s)


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    """(8, T) codes (6 kbps), 2 s; the vocoder costs the same whatever their values."""
    return np.random.default_rng(3).integers(0, 1024, size=(8, 150), dtype=np.int64)


@pytest.fixture(scope="module")
def client(triton) -> Iterator[VocosClient]:
    with VocosClient(triton.grpc_url, timeout=120) as vc:
        yield vc


def random_chunks(array: np.ndarray, seed: int, largest: int = 40) -> List[np.ndarray]:
    """Random chunk sizes in [1, largest], at least a few of them 1 frame."""
    rng = np.random.default_rng(seed)
    chunks, start = [], 0
    while start < array.shape[1]:
        size = 1 if rng.random() < 0.3 else int(rng.integers(1, largest + 1))
        chunks.append(array[:, start:start + size])
        start += size
    assert any(chunk.shape[1] == 1 for chunk in chunks)
    return chunks


def kwargs_for(kind: str, value, bandwidth=None) -> dict:
    return {kind: value} if bandwidth is None else {kind: value, "bandwidth": bandwidth}


def joined(pieces: List[np.ndarray]) -> np.ndarray:
    assert pieces and all(p.dtype == np.float32 and p.ndim == 1 and p.size for p in pieces)
    return np.concatenate(pieces)


# -- exactness ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mel", "codes"])
@pytest.mark.parametrize("how", ["whole", "chunk_frames=1", "chunk_frames=17", "iterable", "generator"])
def test_stream_equals_synthesize(client, mel, codes, kind, how):
    array = mel if kind == "mel" else codes
    expected = client.synthesize(**{kind: array})
    if how == "whole":
        pieces = list(client.stream(**{kind: array}))
    elif how.startswith("chunk_frames="):
        pieces = list(client.stream(**{kind: array}, chunk_frames=int(how.split("=")[1])))
    elif how == "iterable":
        pieces = list(client.stream(**{kind: random_chunks(array, seed=1)}))
    else:
        pieces = list(client.stream(**{kind: iter(random_chunks(array, seed=2))}))
    audio = joined(pieces)
    assert audio.shape == expected.shape
    assert ref.max_error(audio, expected) <= EXACT
    # (how many pieces a chunked stream comes back in depends on how far the server's worker is behind:
    # it runs waiting chunks together; audio arriving before the input ends is tested below)


def test_a_torch_tensor_is_a_whole_array(client, mel):
    import torch

    audio = joined(list(client.stream(mel=torch.from_numpy(mel), chunk_frames=50)))
    assert ref.max_error(audio, client.synthesize(mel=mel)) <= EXACT


def test_codes_bandwidth_given_and_smaller_k(client):
    codes = np.random.default_rng(4).integers(0, 1024, size=(2, 60))  # 1.5 kbps, int dtype of numpy's default
    expected = client.synthesize(codes=codes, bandwidth=1.5)
    audio = joined(list(client.stream(codes=random_chunks(codes, seed=3, largest=9), bandwidth=1.5)))
    assert ref.max_error(audio, expected) <= EXACT


@pytest.mark.parametrize("kind", ["mel", "codes"])
def test_async_stream_equals_synthesize(triton, mel, codes, kind):
    array = mel if kind == "mel" else codes

    async def main():
        async with AsyncVocosClient(triton.grpc_url, timeout=120) as ac:
            expected = await ac.synthesize(**{kind: array})

            async def produce():
                for chunk in random_chunks(array, seed=5):
                    await asyncio.sleep(0)
                    yield chunk

            whole = [p async for p in ac.stream(**{kind: array})]
            chunked = [p async for p in ac.stream(**{kind: array}, chunk_frames=7)]
            from_async = [p async for p in ac.stream(**{kind: produce()})]
            from_plain = [p async for p in ac.stream(**{kind: random_chunks(array, seed=6)})]
            return expected, (whole, chunked, from_async, from_plain)

    expected, results = asyncio.run(main())
    for pieces in results:
        assert ref.max_error(joined(pieces), expected) <= EXACT


# -- the producer is consumed as it produces -------------------------------------------------------------
def test_producer_is_consumed_lazily_and_audio_starts_before_it_ends(client, mel):
    """The producer stops after 60 frames until the first piece has arrived: a client that read ahead
    (or waited for the end of the input) would never see audio, and the producer would time out."""
    first_piece = threading.Event()
    pulled: List[int] = []

    def producer():
        for index, start in enumerate(range(0, mel.shape[1], 10)):
            if start == 60:
                assert first_piece.wait(timeout=60), "no audio came before the producer was exhausted"
            pulled.append(index)
            yield mel[:, start:start + 10]

    pieces = []
    for piece in client.stream(mel=producer()):
        if not first_piece.is_set():
            assert len(pulled) == 6  # 60 frames made, none read ahead
            first_piece.set()
        pieces.append(piece)
    assert ref.max_error(joined(pieces), client.synthesize(mel=mel)) <= EXACT
    assert len(pulled) == len(range(0, mel.shape[1], 10))


def test_async_producer_is_consumed_lazily(triton, mel):
    async def main():
        first_piece = asyncio.Event()
        pulled = []

        async def producer():
            for index, start in enumerate(range(0, mel.shape[1], 10)):
                if start == 60:
                    await asyncio.wait_for(first_piece.wait(), timeout=60)
                pulled.append(index)
                yield mel[:, start:start + 10]

        async with AsyncVocosClient(triton.grpc_url, timeout=120) as ac:
            pieces = []
            async for piece in ac.stream(mel=producer()):
                if not first_piece.is_set():
                    assert len(pulled) == 6
                    first_piece.set()
                pieces.append(piece)
            return pieces, await ac.synthesize(mel=mel)

    pieces, expected = asyncio.run(main())
    assert ref.max_error(joined(pieces), expected) <= EXACT


# -- cancellation ---------------------------------------------------------------------------------------------
def test_closing_early_cancels_and_the_next_stream_works(client, mel):
    for _ in range(3):
        stream = client.stream(mel=mel, chunk_frames=10)
        next(stream)
        stream.close()
    for _piece in client.stream(mel=iter(random_chunks(mel, seed=7))):
        break  # leaving the loop closes the generator (CPython frees it at once)
    assert ref.max_error(joined(list(client.stream(mel=mel))), client.synthesize(mel=mel)) <= EXACT


def test_a_failing_producer_ends_the_stream_with_its_exception(client, mel):
    def producer():
        yield mel[:, :40]
        raise RuntimeError("acoustic model failed")

    with pytest.raises(RuntimeError, match="acoustic model failed"):
        list(client.stream(mel=producer()))
    assert joined(list(client.stream(mel=mel[:, :50]))).shape == ((50 - 1) * 256,)


def test_a_stream_timeout_cancels_it(triton, mel):
    stall = threading.Event()

    def producer():
        yield mel[:, :40]
        stall.wait(timeout=30)  # the acoustic model hangs
        yield mel[:, 40:80]

    with VocosClient(triton.grpc_url, timeout=60) as vc:
        began = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            list(vc.stream(mel=producer(), timeout=1.5))
        assert time.monotonic() - began < 20
        stall.set()
        assert joined(list(vc.stream(mel=mel))).size == (mel.shape[1] - 1) * 256


def test_async_cancellation_by_aclose_and_by_task_cancel(triton, mel):
    async def main():
        async with AsyncVocosClient(triton.grpc_url, timeout=60) as ac:
            stream = ac.stream(mel=mel, chunk_frames=10)
            await stream.__anext__()
            await stream.aclose()

            async def consume_forever():
                async def endless():
                    while True:
                        yield mel[:, :10]
                        await asyncio.sleep(0.05)
                async for _ in ac.stream(mel=endless()):
                    pass

            task = asyncio.ensure_future(consume_forever())
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return [p async for p in ac.stream(mel=mel)], await ac.synthesize(mel=mel)

    pieces, expected = asyncio.run(main())
    assert ref.max_error(joined(pieces), expected) <= EXACT


def _open_slots(grpc_client, model: str) -> int:
    config = grpc_client.get_model_config(model).config
    return int(config.parameters["max_open_sequences"].string_value)


@pytest.mark.slow
def test_busy_server_is_retried_at_the_start_and_abandoned_streams_do_not_lock_it_out(triton, grpc_client, mel):
    """Fill every sequence slot with live streams: one more gets UNAVAILABLE ("busy") without retries,
    and with retries it starts as soon as a slot frees. Then abandon a full set of streams without END:
    after the idle timeout a patient client streams again."""
    slots = _open_slots(grpc_client, Model.VOCOS_MEL_STREAM)
    release = threading.Event()
    started = threading.Barrier(slots + 1, timeout=120)
    errors: List[BaseException] = []

    def held_stream(vc: VocosClient) -> None:
        def producer():
            yield mel[:, :40]
            started.wait()
            release.wait(timeout=120)
            yield mel[:, 40:60]
        try:
            list(vc.stream(mel=producer()))
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)

    # Patient: streams that earlier tests abandoned may hold slots until the server's idle timeout.
    with VocosClient(triton.grpc_url, timeout=120, retries=40, backoff=0.5) as holder:
        threads = [threading.Thread(target=held_stream, args=(holder,)) for _ in range(slots)]
        for thread in threads:
            thread.start()
        started.wait()
        time.sleep(0.5)  # the first chunks reach the model
        try:
            with VocosClient(triton.grpc_url, retries=0) as impatient:
                with pytest.raises(ServerUnavailableError, match="busy"):
                    list(impatient.stream(mel=mel[:, :50]))
            with VocosClient(triton.grpc_url, retries=20, backoff=0.2, timeout=60) as patient:
                threading.Timer(1.0, release.set).start()
                began = time.monotonic()
                audio = joined(list(patient.stream(mel=mel[:, :50])))
                assert audio.size == 49 * 256 and time.monotonic() - began >= 0.9
        finally:
            release.set()
            for thread in threads:
                thread.join(timeout=120)
    assert not errors, errors

    # Abandon a full set of streams mid-sequence (no END): their slots come back (on the cancellation, or
    # after the server's idle timeout), and then a full set of new streams runs again.
    def stalled():
        yield mel[:, :40]
        yield mel[:, 40:41]
        release.wait(timeout=60)  # only keeps the feeder threads parked until the test ends
        yield mel[:, :1]

    release.clear()
    patient_options = dict(timeout=90, retries=60, backoff=0.5)
    with VocosClient(triton.grpc_url, **patient_options) as vc:
        abandoned = [vc.stream(mel=stalled()) for _ in range(slots)]
        for stream in abandoned:
            next(stream)
        for stream in abandoned:
            stream.close()
    release.set()
    with VocosClient(triton.grpc_url, **patient_options) as patient, ThreadPoolExecutor(slots) as pool:
        lengths = list(pool.map(lambda _: joined(list(patient.stream(mel=mel[:, :40]))).size, range(slots)))
    assert lengths == [39 * 256] * slots


# -- validation: local checks say what the server says ------------------------------------------------------
BAD_STREAMS = {
    "nan": ("mel", lambda m, c: [m[:, :40], np.full((100, 3), np.nan, np.float32)], None),
    "too short": ("mel", lambda m, c: [m[:, :1]], None),
    "k changes": ("codes", lambda m, c: [c[:, :5], c[:4, 5:10]], None),
    "k vs bandwidth": ("codes", lambda m, c: [c[:4, :5]], 6.0),
    "out of range": ("codes", lambda m, c: [c[:, :5], np.full((8, 2), 1024)], None),
    "negative": ("codes", lambda m, c: [c[:, :5], np.full((8, 2), -1)], None),
}


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_local_checks_match_the_server(triton, mel, codes, case):
    kind, make, bandwidth = BAD_STREAMS[case]
    messages = {}
    for validate in (True, False):
        with VocosClient(triton.grpc_url, validate=validate, retries=20, backoff=0.5) as vc:
            with pytest.raises(InvalidInputError) as caught:
                list(vc.stream(**kwargs_for(kind, make(mel, codes), bandwidth)))
        error = caught.value
        assert error.tensor == kind
        assert (error.status is None) == validate, error.status  # local: nothing was sent
        messages[validate] = str(error)
    assert messages[True] == messages[False]


def test_stream_longer_than_max_seconds_is_refused_at_the_chunk_that_crosses(triton, mel):
    with VocosClient(triton.grpc_url, max_seconds=1.0) as vc:  # 94 frames
        with pytest.raises(InvalidInputError, match=r"^mel: expected at most 94 frames \(1 s\) in a sequence, "
                                                    r"this chunk brings it to 100"):
            list(vc.stream(mel=[mel[:, :60], mel[:, 60:100]]))
        # a whole array is checked before sending, chunk by chunk as the server would
        with pytest.raises(InvalidInputError, match="this chunk brings it to 100"):
            list(vc.stream(mel=mel[:, :150], chunk_frames=50))
        with pytest.raises(InvalidInputError, match=r"^mel: expected at most 94 frames \(1.00267 s\), got 150"):
            list(vc.stream(mel=mel[:, :150]))


@pytest.mark.parametrize("call, message", [
    (dict(mel=np.zeros((80, 10), np.float32)), "mel: expected 100 mel bins, got 80"),
    (dict(mel=np.zeros((100, 10), np.float32), bandwidth=6.0), "bandwidth: the mel vocoder has no bandwidth"),
    (dict(codes=np.zeros((8, 10), np.int64), bandwidth=5.0), "bandwidth: expected one of 1.5, 3, 6, 12 kbps"),
    (dict(codes=np.zeros((3, 10), np.int64)), "codes: expected 2, 4, 8 or 16 codebooks"),
    (dict(mel=np.zeros((100, 1), np.float32)), "mel: expected at least 2 frames in a sequence, it ended with 1"),
    (dict(mel=[]), "mel: expected at least 2 frames in a sequence, it ended with 0"),
    (dict(mel=np.zeros((100, 0), np.float32)), "mel: expected at least 1 frames, got an empty mel"),
    (dict(mel=np.zeros((100, 10), np.float32), codes=np.zeros((8, 10), np.int64)), "expected exactly one of"),
    (dict(mel="mel.npy"), "mel: expected a numpy array or an iterable of chunks"),
])
def test_bad_calls_fail_before_anything_is_sent(call, message):
    from vocos_triton.launcher.server import free_port

    with VocosClient(f"127.0.0.1:{free_port()}", retries=0) as vc:  # nothing listens there
        with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            list(vc.stream(**call))


def test_chunk_frames_needs_a_whole_array(client, mel):
    with pytest.raises(ValueError, match="chunk_frames"):
        client.stream(mel=[mel], chunk_frames=10)
    with pytest.raises(ValueError, match="chunk_frames"):
        client.stream(mel=mel, chunk_frames=0)
