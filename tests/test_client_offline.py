"""Client SDK without a server: input conversion, resampling, model choice, local errors, imports."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import Dict, List, Tuple

import numpy as np
import pytest
import soxr
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from vocos_client import (
    AsyncVocosClient,
    InvalidInputError,
    ServerError,
    ServerUnavailableError,
    Variant,
    VocosClient,
    VocosError,
    pcm_to_float32,
)
from vocos_client._errors import from_triton
from vocos_client._inputs import Limits, prepare
from vocos_client._variants import GeometryCache, configs_to_read, describe_variants, variants_from_models
from vocos_triton.contract import ENCODEC_24KHZ, MEL_24KHZ, Geometry
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
    assert Limits().max_samples(MEL_24KHZ) == 1_440_000
    assert Limits().max_frames(MEL_24KHZ) == 5626 and Limits().max_frames(ENCODEC_24KHZ) == 4500
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
    from vocos_client import DeadlineExceededError

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


# -- variants: another geometry, named models ----------------------------------------------------------
MATCHA = Geometry("mel", 22050, 80, 256, 1024, "center")  # a 22.05 kHz, 80-bin checkpoint (e.g. for Matcha-TTS)
SAME_PADDED = Geometry("mel", 16000, 80, 200, 800, "same")


def test_prepare_with_a_22k_80_bin_geometry():
    mel = prepare(mel=RNG.standard_normal((80, 20)), geometry=MATCHA, variant="matcha-22k")
    assert mel.model == "vocos_mel__matcha-22k" and mel.inputs["mel"].shape == (80, 20)
    assert prepare(mel=np.zeros((80, 5), np.float32), geometry={"mel": MATCHA}).model == "vocos_mel"
    with pytest.raises(InvalidInputError, match=r"^mel: expected 80 mel bins, got 100$"):
        prepare(mel=np.zeros((100, 20), np.float32), geometry=MATCHA, variant="matcha-22k")
    with pytest.raises(InvalidInputError, match=r"^mel: expected at least 2 frames, got 1$"):
        prepare(mel=np.zeros((80, 1), np.float32), geometry=MATCHA)
    limit = Limits(1.0).max_frames(MATCHA)  # 1 + 22050 // 256
    assert limit == 87
    with pytest.raises(InvalidInputError, match=rf"^mel: expected at most {limit} frames \(1.01007 s\), got 88"):
        prepare(mel=np.zeros((80, 88), np.float32), geometry=MATCHA, limits=Limits(1.0))
    # a "same"-padded checkpoint makes audio from one frame
    assert prepare(mel=np.zeros((80, 1), np.float32), geometry=SAME_PADDED).inputs["mel"].shape == (80, 1)
    with pytest.raises(InvalidInputError, match=r"^sample_rate: only applies to audio=, not mel= \(mel and codes "
                                                r"are 22.05 kHz by construction\)"):
        prepare(mel=np.zeros((80, 5), np.float32), sample_rate=22050, geometry=MATCHA)


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100])
def test_audio_is_resampled_to_the_variants_rate(rate):
    x = RNG.uniform(-0.5, 0.5, rate // 2).astype(np.float32)
    request = prepare(audio=x, sample_rate=rate, geometry=MATCHA, variant="matcha-22k")
    assert request.model == "resynthesize_mel__matcha-22k"
    expected = x if rate == 22050 else soxr.resample(x, rate, 22050, quality="HQ")
    np.testing.assert_array_equal(request.inputs["audio"], expected)
    assert MATCHA.min_samples == 513
    with pytest.raises(InvalidInputError, match=r"^audio: expected at least 513 samples, got 320$"):
        prepare(audio=np.zeros(232, np.float32), sample_rate=16000, geometry=MATCHA)  # 232 * 22050 / 16000


def test_prepare_needs_the_geometry_of_the_calls_kind():
    with pytest.raises(ValueError, match="this call needs a encodec geometry, got a mel one"):
        prepare(codes=np.zeros((8, 5), np.int64), geometry=MATCHA)
    with pytest.raises(ValueError, match="no encodec geometry given"):
        prepare(codes=np.zeros((8, 5), np.int64), geometry={"mel": MATCHA})


def test_a_variants_bandwidths_are_checked():
    six_only = Geometry("encodec", 24000, 128, 320, 1280, "same", (6.0,))
    assert prepare(codes=np.zeros((8, 5), np.int64), geometry=six_only, variant="bark").model == "decode_codes__bark"
    with pytest.raises(InvalidInputError, match=r"^bandwidth: expected one of 6 kbps, got 3$"):
        prepare(codes=np.zeros((4, 5), np.int64), bandwidth=3.0, geometry=six_only)
    with pytest.raises(InvalidInputError, match=r"^codes: 16 codebooks are 12 kbps, which this model does not serve"):
        prepare(codes=np.zeros((16, 5), np.int64), geometry=six_only)
    with pytest.raises(InvalidInputError, match=r"^bandwidth: expected one of 6 kbps, got 1.5$"):
        prepare(audio=np.zeros(2400, np.float32), sample_rate=24000, bandwidth=1.5, geometry=six_only)


@pytest.mark.parametrize("variant, message", [
    ("Matcha 22k", "variant name 'Matcha 22k': expected lower-case letters and digits"),
    ("a__b", "variant name 'a__b'"),
    (3, "variant: expected a variant name (str) or None, got int"),
])
def test_bad_variant_names_need_no_server(variant, message):
    with VocosClient(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as vc:
        with pytest.raises(InvalidInputError) as info:
            vc.synthesize(mel=np.zeros((100, 5), np.float32), variant=variant)
        assert str(info.value).startswith(message) and info.value.tensor is None
        with pytest.raises(InvalidInputError, match="variant"):
            vc.stream(mel=np.zeros((100, 5), np.float32), variant=variant)


# -- variants: what the server publishes, parsed and grouped ----------------------------------------------
def published(geometry: Geometry, variant: str, **extra: str) -> Dict[str, str]:
    return {**geometry.parameters(), "variant": variant, "max_seconds": "60", **extra}


#: a server's loaded models and their config parameters: the default variant (its configs publish the
#: geometry), a named mel variant with a streaming model, a named EnCodec one without, the shared EnCodec
#: encoder and an unrelated model
SERVER = {
    "vocos_mel": published(MEL_24KHZ, "default"),
    "vocos_mel_stream": published(MEL_24KHZ, "default", lookahead_frames="29"),
    "mel_features": published(MEL_24KHZ, "default"),
    "resynthesize_mel": {},
    "vocos_encodec": published(ENCODEC_24KHZ, "default"),
    "decode_codes": {},
    "decode_codes_stream": published(ENCODEC_24KHZ, "default", lookahead_frames="29"),
    "encodec_embedding": published(ENCODEC_24KHZ, "default"),
    "resynthesize_encodec": {},
    "encodec_encoder": {"input_kind": "encodec"},
    "vocos_mel__matcha-22k": published(MATCHA, "matcha-22k"),
    "vocos_mel_stream__matcha-22k": published(MATCHA, "matcha-22k", lookahead_frames="12"),
    "mel_features__matcha-22k": published(MATCHA, "matcha-22k"),
    "resynthesize_mel__matcha-22k": {},
    "vocos_encodec__bark": published(Geometry("encodec", 24000, 128, 320, 1280, "same", (6.0,)), "bark"),
    "decode_codes__bark": {},
    "ensemble__x__y": {},
}


def test_variants_from_model_names_and_configs():
    names = list(SERVER)
    assert set(configs_to_read(names)) == {"vocos_mel", "vocos_mel_stream", "vocos_encodec", "decode_codes_stream",
                                           "vocos_mel__matcha-22k", "vocos_mel_stream__matcha-22k",
                                           "vocos_encodec__bark"}
    found = variants_from_models(reversed(names), SERVER)
    assert [(v.name, v.kind) for v in found] == [("default", "encodec"), ("default", "mel"), ("bark", "encodec"),
                                                 ("matcha-22k", "mel")]
    default_encodec, default_mel, bark, matcha = found
    assert default_mel == Variant("default", "mel", 24000, 100, 256, 1024, "center", 29, (),
                                  ("mel_features", "vocos_mel", "vocos_mel_stream", "resynthesize_mel"))
    assert default_encodec.bandwidths == (1.5, 3.0, 6.0, 12.0) and default_encodec.padding == "same"
    assert "encodec_encoder" not in default_encodec.models  # shared by every variant
    assert matcha.geometry == MATCHA and matcha.lookahead_frames == 12 and matcha.sample_rate == 22050
    assert matcha.models == ("mel_features__matcha-22k", "vocos_mel__matcha-22k", "vocos_mel_stream__matcha-22k",
                             "resynthesize_mel__matcha-22k")
    assert bark.lookahead_frames is None and bark.bandwidths == (6.0,)  # no streaming model
    assert bark.models == ("vocos_encodec__bark", "decode_codes__bark")
    assert describe_variants(names) == "default (mel, encodec), bark (encodec), matcha-22k (mel)"


def test_the_default_variant_of_an_older_server_has_the_charactr_geometry():
    old = {name: {} for name in ("vocos_mel", "vocos_mel_stream", "vocos_encodec", "decode_codes")}
    found = variants_from_models(old, old)
    assert [v.geometry for v in found] == [ENCODEC_24KHZ, MEL_24KHZ]  # (name != "default", name, kind)
    assert [v.lookahead_frames for v in found] == [None, None]
    with pytest.raises(ValueError, match=r"model vocos_mel__x: no parameter 'input_kind'"):
        variants_from_models(["vocos_mel__x"], {"vocos_mel__x": {"variant": "x"}})
    with pytest.raises(ValueError, match=r"model vocos_mel__x: parameter 'input_kind' is 'encodec', expected 'mel'"):
        variants_from_models(["vocos_mel__x"], {"vocos_mel__x": ENCODEC_24KHZ.parameters()})
    cache = GeometryCache()
    assert cache.learn("default", "mel", {}) == MEL_24KHZ and cache.get("default", "mel") is None  # not kept
    assert cache.learn("x", "mel", MATCHA.parameters()) == MATCHA and cache.get("x", "mel") == MATCHA
    with pytest.raises(ServerError, match="n_fft"):
        cache.learn("y", "mel", {**MATCHA.parameters(), "n_fft": "many"})


# -- variants against a stand-in for tritonclient: lookups, caching, fallbacks, errors ------------------
class FakeTriton:
    """What the clients call of ``tritonclient.grpc.InferenceServerClient``, answered from ``configs``
    ({model: config parameters}); ``infer`` returns one second of zeros at 24 kHz and records the request."""

    def __init__(self, configs: Dict[str, Dict[str, str]], unreachable: bool = False) -> None:
        self.configs = configs
        self.unreachable = unreachable
        self.refusal = ""  # an INVALID_ARGUMENT message for every inference
        self.calls: List[tuple] = []

    def _check(self) -> None:
        if self.unreachable:
            raise InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")

    def get_model_config(self, model_name, model_version="", headers=None, as_json=False, client_timeout=None):
        self.calls.append(("config", model_name))
        self._check()
        if model_name not in self.configs:
            raise InferenceServerException(f"Request for unknown model: '{model_name}' is not found",
                                           status="StatusCode.NOT_FOUND")
        response = service_pb2.ModelConfigResponse()
        response.config.name = model_name
        for key, value in self.configs[model_name].items():
            response.config.parameters[key].string_value = value
        return response

    def get_inference_statistics(self, model_name="", model_version="", headers=None, as_json=False,
                                 client_timeout=None):
        self.calls.append(("statistics",))
        self._check()
        response = service_pb2.ModelStatisticsResponse()
        for name in self.configs:
            response.model_stats.add(name=name, version="1")
        return response

    def infer(self, model_name, inputs, outputs=None, client_timeout=None, headers=None, timeout=None, **kwargs):
        self.calls.append(("infer", model_name, {i.name(): tuple(i.shape()) for i in inputs}))
        self._check()
        if self.refusal:
            raise InferenceServerException(self.refusal, status="StatusCode.INVALID_ARGUMENT")
        return FakeResult()

    def close(self) -> None:
        pass


class FakeResult:
    def as_numpy(self, name):
        return np.zeros((1, 24000), np.float32)


class FakeAioTriton:
    """The asyncio twin: the same answers, awaited."""

    def __init__(self, sync: FakeTriton) -> None:
        self.sync = sync

    def __getattr__(self, name):
        method = getattr(self.sync, name)

        async def call(*args, **kwargs):
            await asyncio.sleep(0)
            return method(*args, **kwargs)

        return call


def fake_client(configs=None, **options) -> Tuple[VocosClient, FakeTriton]:
    client = VocosClient(f"127.0.0.1:{free_port()}", **options)
    client._client.close()
    fake = FakeTriton(SERVER if configs is None else configs)
    client._client = fake
    return client, fake


def test_a_named_variant_is_looked_up_once_and_validated_with_its_geometry():
    vc, fake = fake_client()
    with pytest.raises(InvalidInputError, match=r"^mel: expected 80 mel bins, got 100$"):
        vc.synthesize(mel=np.zeros((100, 20), np.float32), variant="matcha-22k")
    vc.synthesize(mel=np.zeros((80, 20), np.float32), variant="matcha-22k")
    vc.synthesize(audio=np.zeros(16000, np.float32), sample_rate=16000, variant="matcha-22k")
    assert fake.calls == [("config", "vocos_mel__matcha-22k"),  # once: then cached
                          ("infer", "vocos_mel__matcha-22k", {"mel": (1, 80, 20)}),
                          ("infer", "resynthesize_mel__matcha-22k", {"audio": (1, 22050)})]  # resampled to 22.05 kHz
    assert vc.sample_rate_of("matcha-22k") == 22050 and vc.sample_rate == 24000
    assert vc.geometry_of("matcha-22k") == MATCHA
    # streaming: the variant's streaming model, checked with its geometry, before anything is sent
    with pytest.raises(InvalidInputError, match=r"^mel: expected 80 mel bins, got 100$"):
        vc.stream(mel=np.zeros((100, 20), np.float32), variant="matcha-22k")
    assert fake.calls[-1][0] == "infer"  # no new lookup
    vc.close()


def test_a_variant_the_server_does_not_hold_is_invalid_input():
    vc, fake = fake_client()
    with pytest.raises(InvalidInputError) as info:
        vc.synthesize(codes=np.zeros((8, 5), np.int64), variant="matcha-22k")
    assert str(info.value) == ("variant: the server has no encodec variant 'matcha-22k' (no model "
                               "vocos_encodec__matcha-22k); it has: default (mel, encodec), bark (encodec), "
                               "matcha-22k (mel)")
    assert info.value.tensor is None and info.value.status is None
    with pytest.raises(InvalidInputError, match="the server has no mel variant 'nope'"):
        vc.sample_rate_of("nope")
    with pytest.raises(InvalidInputError, match="the server has no mel variant 'nope'"):
        vc.stream(mel=np.zeros((80, 5), np.float32), variant="nope")
    assert not [call for call in fake.calls if call[0] == "infer"]
    # a lookup that fails is not remembered: the variant may be added later
    fake.configs = {**SERVER, "vocos_encodec__matcha-22k": published(ENCODEC_24KHZ, "matcha-22k")}
    vc.synthesize(codes=np.zeros((8, 5), np.int64), variant="matcha-22k")
    assert fake.calls[-1] == ("infer", "decode_codes__matcha-22k", {"codes": (1, 8, 5), "bandwidth": (1, 1)})


def test_a_refusal_by_the_server_is_raised_and_the_geometry_asked_again():
    vc, fake = fake_client()
    vc.synthesize(mel=np.zeros((80, 5), np.float32), variant="matcha-22k")
    fake.refusal = "mel: expected 96 mel bins, got 80"  # the server was rebuilt with another checkpoint
    with pytest.raises(InvalidInputError, match="^mel: expected 96 mel bins, got 80$") as info:
        vc.synthesize(mel=np.zeros((80, 5), np.float32), variant="matcha-22k")
    assert info.value.status == "StatusCode.INVALID_ARGUMENT"
    fake.refusal = ""
    fake.calls.clear()
    vc.synthesize(mel=np.zeros((80, 5), np.float32), variant="matcha-22k")
    assert fake.calls[0] == ("config", "vocos_mel__matcha-22k")


def test_a_named_variant_follows_the_retry_rules():
    vc, fake = fake_client(retries=1, backoff=0.01)
    fake.unreachable = True
    with pytest.raises(ServerUnavailableError, match="2 attempts") as info:
        vc.synthesize(mel=np.zeros((80, 5), np.float32), variant="matcha-22k")
    assert info.value.attempts == 2 and fake.calls == [("config", "vocos_mel__matcha-22k")] * 2


def test_the_default_variant_falls_back_to_the_charactr_geometry_and_asks_again():
    old = {name: {} for name in SERVER if "__" not in name}  # a server from before variants: no geometry
    vc, fake = fake_client(old)
    for _ in range(2):
        with pytest.raises(InvalidInputError, match=r"^mel: expected 100 mel bins, got 80$"):
            vc.synthesize(mel=np.zeros((80, 5), np.float32))
    assert fake.calls == [("config", "vocos_mel")] * 2  # asked each time, nothing cached
    assert vc.sample_rate_of() == 24000 and vc.sample_rate_of(kind="encodec") == 24000
    fake.configs = SERVER  # the server now publishes its geometry: learnt once
    fake.calls.clear()
    for _ in range(2):
        vc.synthesize(mel=np.zeros((100, 5), np.float32))
    assert fake.calls == [("config", "vocos_mel"), ("infer", "vocos_mel", {"mel": (1, 100, 5)}),
                          ("infer", "vocos_mel", {"mel": (1, 100, 5)})]
    # unreachable: the lookup is retried like any call (another replica may answer); once the call's retries are
    # spent, the input is still checked with the default geometry, and the call fails unavailable without
    # another attempt
    fake.unreachable = True
    fake.calls.clear()
    with pytest.raises(InvalidInputError, match=r"^codes: expected integer codes"):
        vc.synthesize(codes=np.zeros((8, 5), np.float32), timeout=0.3)
    fake.calls.clear()
    with pytest.raises(ServerUnavailableError):
        vc.synthesize(codes=np.zeros((8, 5), np.int64), timeout=0.3)
    assert fake.calls and all(call == ("config", "vocos_encodec") for call in fake.calls)
    with pytest.raises(ValueError, match="kind: expected 'mel' or 'encodec'"):
        vc.sample_rate_of(kind="codes")


def test_variants_lists_what_the_server_holds_and_fills_the_cache():
    vc, fake = fake_client()
    found = vc.variants()
    assert found == variants_from_models(SERVER, SERVER)
    assert ("statistics",) in fake.calls and ("config", "vocos_mel_stream__matcha-22k") in fake.calls
    fake.calls.clear()
    assert vc.sample_rate_of("matcha-22k") == 22050 and vc.geometry_of("bark", "encodec").bandwidths == (6.0,)
    assert fake.calls == []  # learnt from the list


def test_batch_items_may_name_their_variant():
    vc, fake = fake_client()
    items = [np.zeros((100, 5), np.float32),
             {"mel": np.zeros((80, 5), np.float32), "variant": "matcha-22k"},
             {"codes": np.zeros((8, 5), np.int64), "variant": "matcha-22k"},
             {"mel": np.zeros((80, 6), np.float32)}]
    results = vc.synthesize_batch(items, variant="matcha-22k", return_exceptions=True)
    assert isinstance(results[0], InvalidInputError) and str(results[0]) == "item 0: mel: expected 80 mel bins, got 100"
    assert isinstance(results[1], np.ndarray) and isinstance(results[3], np.ndarray)
    assert str(results[2]).startswith("item 2: variant: the server has no encodec variant 'matcha-22k'")
    lookups = [call for call in fake.calls if call[0] == "config"]
    assert lookups == [("config", "vocos_mel__matcha-22k"), ("config", "vocos_encodec__matcha-22k")]  # once each
    with pytest.raises(InvalidInputError, match="^item 1: variant: the server has no encodec variant"):  # lowest wins
        vc.synthesize_batch(items[1:3] + [{"mel": np.zeros((80, 5), np.float32), "variant": "x", "pitch": 1}])
    with pytest.raises(InvalidInputError, match=r"^item 0: unexpected keys \['pitch'\]; expected mel, audio, "
                                                r"sample_rate, bandwidth, codes, variant"):
        vc.synthesize_batch([{"mel": np.zeros((80, 5), np.float32), "pitch": 1}])


def test_async_client_variants():
    async def main():
        client = AsyncVocosClient(f"127.0.0.1:{free_port()}")
        fake = FakeTriton(SERVER)
        client._client = FakeAioTriton(fake)
        found = await client.variants()
        with pytest.raises(InvalidInputError, match=r"^mel: expected 80 mel bins, got 100$"):
            await client.synthesize(mel=np.zeros((100, 20), np.float32), variant="matcha-22k")
        audio = await client.synthesize(mel=np.zeros((80, 20), np.float32), variant="matcha-22k")
        batch = await client.synthesize_batch([np.zeros((80, 5), np.float32)], variant="matcha-22k")
        rate = await client.sample_rate_of("matcha-22k")
        with pytest.raises(InvalidInputError, match="the server has no mel variant 'nope'"):
            await client.synthesize(mel=np.zeros((80, 5), np.float32), variant="nope")
        stream = client.stream(mel=np.zeros((100, 20), np.float32), variant="matcha-22k")  # checked on iteration
        with pytest.raises(InvalidInputError, match=r"^mel: expected 80 mel bins, got 100$"):
            await stream.__anext__()
        with pytest.raises(ValueError, match="chunk_frames"):  # the call itself: checked at once
            client.stream(mel=[np.zeros((80, 5), np.float32)], chunk_frames=2, variant="matcha-22k")
        client._client = None
        await client.close()
        return found, audio, batch, rate, fake.calls

    found, audio, batch, rate, calls = asyncio.run(main())
    assert found == variants_from_models(SERVER, SERVER) and rate == 22050
    assert audio.shape == (24000,) and len(batch) == 1
    assert ("infer", "vocos_mel__matcha-22k", {"mel": (1, 80, 20)}) in calls


def test_stream_plan_uses_the_variants_streaming_model_and_minimum():
    from vocos_client._stream import plan

    vc, _ = fake_client()
    options = vc._options
    planned = plan(options, mel=np.zeros((80, 9), np.float32), codes=None, bandwidth=None, chunk_frames=4,
                   variant="matcha-22k", geometry=MATCHA)
    assert planned.model == "vocos_mel_stream__matcha-22k" and [c.shape[1] for c in planned.chunks] == [4, 4, 1]
    assert planned.checker.min_frames == 2 and planned.checker.max_frames == Limits().max_frames(MATCHA)
    same = plan(options, mel=np.zeros((80, 1), np.float32), codes=None, bandwidth=None, chunk_frames=None,
                geometry=SAME_PADDED)
    assert same.model == "vocos_mel_stream" and same.checker.min_frames == 1
    with pytest.raises(InvalidInputError, match=r"^mel: expected at least 2 frames in a sequence, it ended with 1$"):
        plan(options, mel=np.zeros((80, 1), np.float32), codes=None, bandwidth=None, chunk_frames=None,
             geometry=MATCHA)
    codes = plan(options, mel=None, codes=np.zeros((8, 5), np.int64), bandwidth=None, chunk_frames=None,
                 variant="bark")
    assert codes.model == "decode_codes_stream__bark"
    vc.close()
