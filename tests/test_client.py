"""Client SDK against a real tritonserver (the session fixture ``triton``) on random-weight models.

Parity is with the reference packages (vocos 0.1.0, encodec 0.1.1) on the same weights, after the
same soxr resampling the client does.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, List

import numpy as np
import pytest
import soxr

from vocos_client import AsyncVocosClient, DeadlineExceededError, InvalidInputError, ServerUnavailableError, VocosClient
from vocos_triton.launcher.server import free_port
from vocos_triton.speech import SENTENCES, speech

import reference_outputs as ref
from triton_helpers import settled_counts

PARITY = 1e-4   # the contract: equal to the reference packages per path
BATCHED = 1e-5  # the contract: a request's output does not depend on what else was in its batch


@pytest.fixture(scope="module")
def vc(triton):
    with VocosClient(triton.grpc_url, timeout=120) as client:
        assert client.ready(timeout=30)
        yield client


@pytest.fixture(scope="module")
def unvalidated(triton):
    """A client that leaves every contract check to the server."""
    with VocosClient(triton.grpc_url, timeout=120, validate=False, retries=0) as client:
        yield client


def down_url() -> str:
    """A loopback port with nothing listening."""
    return f"127.0.0.1:{free_port()}"


def to_24k(audio: np.ndarray, rate: int) -> np.ndarray:
    return audio if rate == 24000 else soxr.resample(audio, rate, 24000, quality="HQ").astype(np.float32)


# -- each input kind equals the reference packages ---------------------------------------------------
def test_mel_equals_vocos_decode(vc, reference_mel, speech_3s):
    mel = ref.mel_features(reference_mel, speech_3s)  # (100, T) as an acoustic model would give it
    y = vc.synthesize(mel=mel)
    assert y.dtype == np.float32 and y.shape == ((mel.shape[1] - 1) * 256,)
    assert ref.max_error(y, ref.mel_decode(reference_mel, mel)) <= PARITY
    # a nested list and a (1, 100, T) float64 array are the same request
    assert ref.max_error(vc.synthesize(mel=mel[None].astype(np.float64)), y) == 0.0
    assert ref.max_error(vc.synthesize(mel=mel[:, :50].tolist()), vc.synthesize(mel=mel[:, :50])) == 0.0


@pytest.mark.parametrize("rate, bandwidth", [(24000, None), (16000, None), (48000, None),
                                             (16000, 6.0), (48000, 6.0), (24000, 1.5), (24000, 12.0)])
def test_audio_equals_vocos_forward(vc, reference_mel, reference_encodec, rate, bandwidth):
    x = speech(SENTENCES[1], sample_rate=rate)[: 2 * rate]  # 2 s of real speech at the input rate
    y = vc.synthesize(audio=x, sample_rate=rate, bandwidth=bandwidth)
    x24 = to_24k(x, rate)
    if bandwidth is None:
        expected = ref.mel_resynthesize(reference_mel, x24)
    else:
        expected = ref.encodec_resynthesize(reference_encodec, x24, bandwidth)
    assert y.dtype == np.float32
    assert ref.max_error(y, expected) <= PARITY


def test_int16_pcm_equals_its_float_value(vc, reference_mel):
    x = speech(SENTENCES[0], sample_rate=16000)
    pcm = np.round(np.clip(x, -1, 1 - 2**-15) * 32768).astype(np.int16)
    y = vc.synthesize(audio=pcm, sample_rate=16000)
    expected = ref.mel_resynthesize(reference_mel, to_24k(pcm.astype(np.float32) / 32768, 16000))
    assert ref.max_error(y, expected) <= PARITY


@pytest.mark.parametrize("bandwidth", [None, 6.0])
def test_bark_style_codes_equal_codes_to_features_then_decode(vc, reference_encodec, speech_3s, bandwidth):
    # (8, T) codes at 6 kbps, as Bark's fine tokens; from the EnCodec encoder so they look like real codes
    codes = ref.encodec_codes(reference_encodec, speech_3s, 6.0)
    assert codes.shape[0] == 8
    y = vc.synthesize(codes=codes.astype(np.int16), bandwidth=bandwidth)
    assert y.shape == (codes.shape[1] * 320,)
    assert ref.max_error(y, ref.decode_codes(reference_encodec, codes, 6.0)) <= PARITY


@pytest.mark.parametrize("k", [2, 16])
def test_codes_infer_the_bandwidth_from_k(vc, reference_encodec, k):
    codes = np.random.default_rng(k).integers(0, 1024, (k, 120)).astype(np.uint16)
    kbps = {2: 1.5, 16: 12.0}[k]
    y = vc.synthesize(codes=codes)
    assert ref.max_error(y, ref.decode_codes(reference_encodec, codes.astype(np.int64), kbps)) <= PARITY


# -- sync, async and batch agree; order; batching ------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_items(speech_3s) -> List[Dict]:
    """Items of different kinds and lengths, in an order that is neither sorted nor reversed."""
    rng = np.random.default_rng(7)
    mel = np.log(np.abs(rng.standard_normal((100, 400))).astype(np.float32) + 1e-3)
    return [
        {"mel": mel[:, :40]},
        {"audio": speech_3s[:30_000], "sample_rate": 24000},
        {"mel": mel[:, :300]},
        {"codes": rng.integers(0, 1024, (8, 90))},
        {"audio": speech(SENTENCES[2], sample_rate=16000)[:20_000], "sample_rate": 16000, "bandwidth": 3.0},
        {"mel": mel[:, :97]},
        {"mel": mel},
        {"codes": rng.integers(0, 1024, (16, 7)), "bandwidth": 12.0},
    ]


def test_sync_async_and_batch_agree_in_order(vc, triton, mixed_items):
    solo = [vc.synthesize(**item) for item in mixed_items]

    async def run_async():
        async with AsyncVocosClient(triton.grpc_url, timeout=120) as avc:
            one_by_one = [await avc.synthesize(**item) for item in mixed_items]
            batch = await avc.synthesize_batch(mixed_items, max_concurrency=4)
            return one_by_one, batch

    async_solo, async_batch = asyncio.run(run_async())
    done: List[int] = []
    sync_batch = vc.synthesize_batch(mixed_items, progress=done.append)
    assert sorted(done) == list(range(len(mixed_items)))
    for i, (a, b, c, d) in enumerate(zip(solo, async_solo, sync_batch, async_batch)):
        assert a.shape == b.shape == c.shape == d.shape, f"item {i}"
        assert np.array_equal(a, b), f"item {i}: async differs from sync"
        assert ref.max_error(a, c) <= BATCHED and ref.max_error(a, d) <= BATCHED, f"item {i}"
    # order: each output has its own item's length ((T - 1) * 256 for mel, T * 320 for EnCodec)
    expected = [39 * 256, (30_000 // 256) * 256, 299 * 256, 90 * 320, 94 * 320, 96 * 256, 399 * 256, 7 * 320]
    assert [y.shape[0] for y in sync_batch] == [y.shape[0] for y in async_batch] == expected


def test_batch_of_mels_is_batched_by_the_server(vc, grpc_client):
    """Concurrent requests reach the model together: fewer executions than inferences."""
    rng = np.random.default_rng(3)
    mels = [rng.standard_normal((100, t)).astype(np.float32) for t in rng.integers(20, 200, 24)]
    before = settled_counts(grpc_client, "vocos_mel")
    ys = vc.synthesize_batch(mels, max_concurrency=8)
    after = settled_counts(grpc_client, "vocos_mel", before, len(mels))
    assert [y.shape[0] for y in ys] == [(m.shape[1] - 1) * 256 for m in mels]
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(mels) and executions < inferences


def test_bad_item_in_batch_is_named_before_anything_is_sent():
    items = [np.zeros((100, 10), np.float32)] * 2 + [np.zeros((80, 10), np.float32), np.zeros((100, 10), np.float32)]
    with VocosClient(down_url(), retries=0) as client:  # nothing listens: nothing could have been sent
        with pytest.raises(InvalidInputError) as info:
            client.synthesize_batch(items)
    assert str(info.value) == "item 2: mel: expected 100 mel bins, got 80"
    assert info.value.item == 2 and info.value.tensor == "mel"


def test_bad_item_in_batch_from_the_server(unvalidated, vc):
    good = [np.full((100, t), -2.0, np.float32) for t in (30, 60, 45)]
    bad = good[1].copy()
    bad[3, 5] = np.nan
    items = [good[0], bad, good[1], good[2]]
    with pytest.raises(InvalidInputError) as info:
        unvalidated.synthesize_batch(items)
    assert str(info.value) == "item 1: mel: expected finite values, got NaN at index [3, 5]"
    assert info.value.item == 1 and info.value.status == "StatusCode.INVALID_ARGUMENT"

    results = unvalidated.synthesize_batch(items, return_exceptions=True)
    assert isinstance(results[1], InvalidInputError) and results[1].item == 1
    for got, item in zip([results[0], results[2], results[3]], [good[0], good[1], good[2]]):
        assert ref.max_error(got, vc.synthesize(mel=item)) <= BATCHED  # the other items still succeed

    async def run_async():
        async with AsyncVocosClient(unvalidated.url, validate=False) as avc:
            with pytest.raises(InvalidInputError, match=r"^item 1: mel: expected finite values"):
                await avc.synthesize_batch(items)
            return await avc.synthesize_batch(items, return_exceptions=True)

    async_results = asyncio.run(run_async())
    assert isinstance(async_results[1], InvalidInputError) and async_results[0].shape == results[0].shape


# -- errors: the same InvalidInputError locally and from the server -------------------------------------
MAX = 1_440_000  # 60 s at 24 kHz, the default limit
CONTRACT_ERRORS = {
    "mel too short": dict(mel=np.zeros((100, 1), np.float32)),
    "mel NaN": dict(mel=np.full((100, 5), np.nan, np.float32)),
    "mel too long": dict(mel=np.zeros((100, 5627), np.float32)),
    "audio too short for mel": dict(audio=np.zeros(512, np.float32), sample_rate=24000),
    "audio too short after resampling": dict(audio=np.zeros(300, np.int16), sample_rate=16000),
    "audio empty": dict(audio=np.zeros(0, np.float32), sample_rate=24000, bandwidth=6.0),
    "audio Inf": dict(audio=np.full(600, np.inf, np.float32), sample_rate=24000, bandwidth=6.0),
    "audio too long": dict(audio=np.zeros(MAX + 1, np.float32), sample_rate=24000),
    "bandwidth not in the set": dict(audio=np.zeros(600, np.float32), sample_rate=24000, bandwidth=5.0),
    "codes K=3": dict(codes=np.zeros((3, 5), np.int64)),
    "codes out of range": dict(codes=np.full((8, 5), 1024)),
    "codes negative": dict(codes=np.full((8, 5), -1)),
    "codes K vs bandwidth": dict(codes=np.zeros((8, 5), np.int64), bandwidth=3.0),
    "codes empty": dict(codes=np.zeros((8, 0), np.int64)),
    "codes too long": dict(codes=np.zeros((8, 4501), np.int64)),
}


@pytest.mark.parametrize("case", list(CONTRACT_ERRORS))
def test_invalid_input_same_locally_and_from_the_server(case, unvalidated):
    kwargs = CONTRACT_ERRORS[case]
    with VocosClient(down_url(), retries=0) as offline:
        with pytest.raises(InvalidInputError) as local:
            offline.synthesize(**kwargs)
    with pytest.raises(InvalidInputError) as remote:
        unvalidated.synthesize(**kwargs)
    assert local.value.status is None and remote.value.status == "StatusCode.INVALID_ARGUMENT"
    assert str(local.value) == str(remote.value)
    assert local.value.tensor == remote.value.tensor == str(local.value).split(":")[0]
    assert remote.value.tensor in {"mel", "audio", "codes", "bandwidth"}


@pytest.mark.parametrize("kwargs, tensor", [(dict(mel=np.zeros((80, 10), np.float32)), "mel"),
                                            (dict(mel=np.zeros(100, np.float32)), "mel"),
                                            (dict(codes=np.zeros((8, 10), np.float64)), "codes")])
def test_triton_core_rejections_name_the_tensor(unvalidated, vc, kwargs, tensor):
    """Shape and dtype errors Triton itself rejects: also InvalidInputError, naming the tensor."""
    with pytest.raises(InvalidInputError) as remote:
        unvalidated.synthesize(**kwargs)
    assert remote.value.tensor == tensor and remote.value.status == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InvalidInputError) as local:
        vc.synthesize(**kwargs)
    assert local.value.tensor == tensor and local.value.status is None
    assert vc.ready()  # the server stays ready


# -- connection: unavailable, retries, deadlines, health, TLS --------------------------------------------
def test_server_down_raises_unavailable_after_the_retries(caplog):
    caplog.set_level(logging.WARNING, logger="vocos_client")
    start = time.monotonic()
    with VocosClient(down_url(), retries=2, backoff=0.05, timeout=10) as client:
        assert client.ready(timeout=2) is False  # a health check answers, never raises or retries
        with pytest.raises(ServerUnavailableError) as info:
            client.synthesize(mel=np.zeros((100, 10), np.float32))
    elapsed = time.monotonic() - start
    assert info.value.status == "StatusCode.UNAVAILABLE" and info.value.attempts == 3
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
    assert elapsed < 10 + 2.0


def test_server_down_gives_up_within_the_timeout():
    timeout = 1.0
    start = time.monotonic()
    with VocosClient(down_url(), retries=100, backoff=0.05, timeout=timeout) as client:
        with pytest.raises(ServerUnavailableError) as info:
            client.synthesize(codes=np.zeros((8, 10), np.int64))
    elapsed = time.monotonic() - start
    assert elapsed < timeout + 1.0  # loose: the deadline covers attempts and backoff together
    assert 1 < info.value.attempts < 101


def test_async_server_down():
    async def run():
        async with AsyncVocosClient(down_url(), retries=1, backoff=0.05, timeout=5) as client:
            assert await client.ready(timeout=2) is False
            with pytest.raises(ServerUnavailableError) as info:
                await client.synthesize(mel=np.zeros((100, 10), np.float32))
            assert info.value.attempts == 2
            with pytest.raises(ServerUnavailableError, match="^item 0: "):
                await client.synthesize_batch([np.zeros((100, 10), np.float32)] * 3)

    asyncio.run(asyncio.wait_for(run(), 30))


def test_deadline_exceeded(vc, triton):
    mel = np.zeros((100, 2000), np.float32)  # about 21 s of audio: cannot be done in 1 ms
    with pytest.raises(DeadlineExceededError) as info:
        vc.synthesize(mel=mel, timeout=0.001)
    assert info.value.status == "StatusCode.DEADLINE_EXCEEDED" and isinstance(info.value, TimeoutError)

    async def run():
        async with AsyncVocosClient(triton.grpc_url) as avc:
            with pytest.raises(DeadlineExceededError):
                await avc.synthesize(mel=mel, timeout=0.001)
            return await avc.ready()

    assert asyncio.run(run())
    assert vc.ready()


def test_ready_checks_named_models(vc):
    assert vc.ready(models=["vocos_mel", "decode_codes"])
    assert not vc.ready(models=["no_such_model"])


def test_tls_channel_is_used(triton):
    # TLS against the plaintext server: the handshake fails, so the ssl option reaches the channel.
    with VocosClient(triton.grpc_url, ssl=True, retries=0, timeout=10) as client:
        assert client.ready(timeout=5) is False
        with pytest.raises(ServerUnavailableError):
            client.synthesize(mel=np.zeros((100, 10), np.float32))
