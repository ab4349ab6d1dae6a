"""Client SDK without a server: input conversion, resampling, model choice, local errors, imports."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soxr
from tritonclient.utils import InferenceServerException

from vocos_client import (
    AsyncVocosClient,
    InvalidInputError,
    ServerUnavailableError,
    VocosClient,
    VocosError,
    pcm_to_float32,
)
from vocos_client._errors import from_triton
from vocos_client._inputs import Limits, prepare
from vocos_triton.launcher.server import free_port

RNG = np.random.default_rng(0)


# -- PCM conversion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, scale, offset", [(np.int16, 2**15, 0), (np.int32, 2**31, 0), (np.int8, 2**7, 0),
                                                  (np.uint8, 2**7, 128)])
def test_integer_pcm_is_scaled_to_full_scale(dtype, scale, offset):
    info = np.iinfo(dtype)
    pcm = np.array([info.min, info.min + 1, offset, offset + 1, info.max], dtype=dtype)
    got = pcm_to_float32(pcm)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, (pcm.astype(np.float64) - offset) / scale, rtol=0, atol=1e-7)
    assert got[0] == -1.0 and got[2] == 0.0 and got[-1] <= 1.0  # int32 max rounds to 1.0 in float32


def test_float_lists_and_shapes():
    x = RNG.uniform(-1, 1, 1000)
    np.testing.assert_array_equal(pcm_to_float32(x), x.astype(np.float32))  # float64 -> float32
    np.testing.assert_array_equal(pcm_to_float32(x.tolist()), x.astype(np.float32))  # a list is float samples
    np.testing.assert_array_equal(pcm_to_float32(x.astype(np.float16)), x.astype(np.float16).astype(np.float32))
    assert pcm_to_float32(x[:, None]).shape == (1000,)  # (L, 1)
    assert pcm_to_float32(x[None, :]).shape == (1000,)  # (1, L)


@pytest.mark.parametrize("audio, expected", [
    (np.zeros((1000, 2), np.float32), "audio: expected mono audio of shape (samples,), got shape (1000, 2)"),
    (np.zeros(10, np.int64), "audio: expected float or int8/int16/int32/uint8 PCM samples, got dtype int64"),
    (np.zeros(10, bool), "audio: expected float or int8/int16/int32/uint8 PCM samples, got dtype bool"),
    (["a", "b"], "audio: expected a sequence of numbers"),
])
def test_unsupported_audio(audio, expected):
    with pytest.raises(InvalidInputError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")) as info:
        pcm_to_float32(audio)
    assert info.value.tensor == "audio" and info.value.status is None


# -- preparation: model, tensors, resampling ---------------------------------------------------------
def test_prepare_picks_model_and_tensors():
    mel = prepare(mel=RNG.standard_normal((100, 20)))  # float64 is cast
    assert mel.model == "vocos_mel" and mel.inputs["mel"].dtype == np.float32
    assert mel.batched()["mel"].shape == (1, 100, 20)
    assert prepare(mel=RNG.standard_normal((1, 100, 20)).astype(np.float32)).inputs["mel"].shape == (100, 20)

    audio = prepare(audio=np.zeros(24000, np.int16), sample_rate=24000)
    assert audio.model == "resynthesize_mel" and set(audio.inputs) == {"audio"}
    enc = prepare(audio=np.zeros(100, np.float32), sample_rate=24000, bandwidth=6)
    assert enc.model == "resynthesize_encodec"
    assert enc.batched()["bandwidth"].shape == (1, 1) and enc.inputs["bandwidth"].dtype == np.float32

    codes = prepare(codes=RNG.integers(0, 1024, (8, 30)).astype(np.uint16))  # Bark fine tokens: (8, T)
    assert codes.model == "decode_codes" and codes.inputs["codes"].dtype == np.int64
    assert float(codes.inputs["bandwidth"][0]) == 6.0  # inferred from K = 8
    assert codes.batched()["codes"].shape == (1, 8, 30)
    for k, kbps in zip((2, 4, 8, 16), (1.5, 3.0, 6.0, 12.0)):
        assert float(prepare(codes=np.zeros((k, 3), np.int32)).inputs["bandwidth"][0]) == kbps
    assert prepare(codes=np.zeros((8, 1, 30), np.int64)).inputs["codes"].shape == (8, 30)  # vocos (K, B, T)
    assert prepare(codes=[[1, 2, 3]] * 2).inputs["codes"].dtype == np.int64  # a list


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_audio_is_resampled_with_soxr_hq(rate):
    x = RNG.uniform(-0.5, 0.5, rate // 2).astype(np.float32)
    got = prepare(audio=x, sample_rate=rate).inputs["audio"]
    np.testing.assert_array_equal(got, soxr.resample(x, rate, 24000, quality="HQ"))
    assert abs(got.shape[0] - x.shape[0] * 24000 / rate) <= 1


def test_int16_audio_at_16k_is_scaled_then_resampled():
    pcm = (RNG.uniform(-0.5, 0.5, 16000) * 32768).astype(np.int16)
    expected = soxr.resample(pcm.astype(np.float32) / 32768, 16000, 24000, quality="HQ")
    np.testing.assert_allclose(prepare(audio=pcm, sample_rate=16000).inputs["audio"], expected, atol=1e-7)


def test_max_seconds_sets_the_limits():
    assert Limits().max_samples == 1_440_000 and Limits().max_mel_frames == 5626 and Limits().max_code_frames == 4500
    with pytest.raises(InvalidInputError, match=r"^audio: expected at most 24000 samples \(1 s\), got 24001"):
        prepare(audio=np.zeros(24001, np.float32), sample_rate=24000, limits=Limits(1.0))


# -- call-level errors: found before anything is sent ------------------------------------------------
CALL_ERRORS = [
    (dict(), None, "expected exactly one of mel=, audio= or codes=, got none"),
    (dict(mel=np.zeros((100, 5), np.float32), codes=np.zeros((8, 5), np.int64)), None,
     "expected exactly one of mel=, audio= or codes=, got mel= and codes="),
    (dict(audio=np.zeros(1000, np.float32)), "sample_rate", "sample_rate: required with audio="),
    (dict(audio=np.zeros(1000, np.float32), sample_rate=-1), "sample_rate", "sample_rate: expected a positive"),
    (dict(audio=np.zeros(1000, np.float32), sample_rate=16000.5), "sample_rate", "sample_rate: expected a positive"),
    (dict(mel=np.zeros((100, 5), np.float32), sample_rate=24000), "sample_rate", "sample_rate: only applies to audio="),
    (dict(mel=np.zeros((100, 5), np.float32), bandwidth=6), "bandwidth", "bandwidth: the mel vocoder has no bandwidth"),
    (dict(codes=np.zeros((8, 5), np.int64), bandwidth="fast"), "bandwidth", "bandwidth: expected kbps as a number"),
    (dict(mel=np.zeros((100, 5), np.complex64)), "mel", "mel: expected dtype float32, got complex64"),
    (dict(codes=np.zeros((8, 5), np.float32)), "codes", "codes: expected integer codes (int64), got dtype float32"),
    (dict(mel=np.zeros((80, 5), np.float32)), "mel", "mel: expected 100 mel bins, got 80"),
    (dict(mel=np.zeros(100, np.float32)), "mel", "mel: expected 2 dimension(s) (mel bins, frames), got shape (100,)"),
]


@pytest.mark.parametrize("kwargs, tensor, message", CALL_ERRORS)
def test_call_errors_need_no_server(kwargs, tensor, message):
    # Nothing listens on this port: an InvalidInputError (not ServerUnavailableError) proves no request was needed.
    with VocosClient(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as vc:
        with pytest.raises(InvalidInputError) as info:
            vc.synthesize(**kwargs)
    assert str(info.value).startswith(message)
    assert info.value.tensor == tensor and info.value.status is None and isinstance(info.value, ValueError)


def test_error_mapping_keeps_the_message():
    def mapped(status, message):
        return from_triton(InferenceServerException(message, status=status))

    e = mapped("StatusCode.INVALID_ARGUMENT", "in ensemble 'decode_codes', codes: expected values in [0, 1024)")
    assert type(e) is InvalidInputError and str(e) == "codes: expected values in [0, 1024)" and e.tensor == "codes"
    assert e.server_message == "in ensemble 'decode_codes', codes: expected values in [0, 1024)"
    e = mapped("StatusCode.INVALID_ARGUMENT", "[request id: <id_unknown>] unexpected shape for input 'mel' for model")
    assert e.tensor == "mel" and str(e).startswith("unexpected shape")
    assert type(mapped("StatusCode.UNAVAILABLE", "down")) is ServerUnavailableError
    from vocos_client import DeadlineExceededError, ServerError

    assert type(mapped("StatusCode.DEADLINE_EXCEEDED", "late")) is DeadlineExceededError
    for status in ("StatusCode.INTERNAL", "StatusCode.UNKNOWN", "StatusCode.RESOURCE_EXHAUSTED", None):
        e = mapped(status, "boom")
        assert type(e) is ServerError and e.status == status and str(e) == "boom"
    item = mapped("StatusCode.INTERNAL", "boom").for_item(3)
    assert str(item) == "item 3: boom" and item.item == 3 and type(item) is ServerError


def test_options_are_checked():
    with pytest.raises(ValueError, match="url"):
        VocosClient("http://localhost:8001")
    with pytest.raises(ValueError, match="retries"):
        VocosClient(retries=-1)
    with pytest.raises(FileNotFoundError, match="TLS file not found"):
        VocosClient(ssl=True, root_certificates="/nonexistent/ca.pem")
    vc = VocosClient()
    vc.close()
    vc.close()  # twice is harmless
    with pytest.raises(VocosError, match="closed"):
        vc.synthesize(mel=np.zeros((100, 5), np.float32))


def test_imports_without_torch():
    """The SDK and its CLI import, construct, convert, resample and validate with torch unimportable."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {{"torch", "torchaudio", "vocos", "encodec"}}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked for this test: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import numpy as np
        import vocos_client, vocos_client.cli
        from vocos_client import AsyncVocosClient, InvalidInputError, VocosClient
        vc = VocosClient("127.0.0.1:{free_port()}", retries=0)
        AsyncVocosClient("127.0.0.1:1")
        try:
            vc.synthesize(mel=np.zeros((80, 10), np.float32))
        except InvalidInputError as exc:
            assert str(exc) == "mel: expected 100 mel bins, got 80", exc
        else:
            raise AssertionError("no InvalidInputError")
        try:
            vc.synthesize(audio=np.zeros(100, np.int16), sample_rate=16000)  # converted and resampled, then too short
        except InvalidInputError as exc:
            assert str(exc) == "audio: expected at least 513 samples, got 150", exc
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_async_client_constructs_outside_a_loop():
    client = AsyncVocosClient(f"127.0.0.1:{free_port()}")
    assert client.sample_rate == 24000 and "AsyncVocosClient" in repr(client)
