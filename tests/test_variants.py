"""Every Vocos: variants of other geometries served beside the default models by the session's tritonserver.

The session repository (conftest.py) holds the default random checkpoints plus the test variants of
``random_checkpoints.TEST_VARIANTS``, each written by the reference ``vocos`` package: 22.05 kHz / 80 bins /
center, 44.1 kHz / 128 bins / hop 512 / ``same`` / dim 768 x 12 layers, and a transformers-layout one. Each is
checked against the reference on real speech at its own rate, batched against solo, streamed against offline,
through the client (geometry, output rate, CLI), and for its build- and start-time refusals.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ENCODEC_VARIANT

from vocos_client import InvalidInputError, VocosClient
from vocos_client.cli import main as cli_main
from vocos_triton import contract as c
from vocos_triton.build import checkpoints as ck
from vocos_triton.build.export import build_repository_atomically, check_variants, parse_variant
from vocos_triton.launcher.preflight import check_repository
from vocos_triton.launcher.server import LaunchError, ServerOptions, TritonServer, free_port
from vocos_triton.speech import SENTENCES, speech

import reference_outputs as ref

PARITY = 1e-4  # served vs the reference package
BATCHED = 1e-5  # in a ragged batch vs alone; streamed vs offline


@pytest.fixture(scope="session")
def variant_references(variant_checkpoints: Dict[str, ck.VocosCheckpoint]) -> Dict[str, torch.nn.Module]:
    return {name: ck.build_reference_vocos(checkpoint) for name, checkpoint in variant_checkpoints.items()}


@pytest.fixture(scope="module")
def client(triton) -> VocosClient:
    with VocosClient(triton.grpc_url, timeout=120) as vc:
        yield vc


def variant_speech(geometry: c.Geometry, seconds: float, sentence: int = 2) -> np.ndarray:
    """Real speech (espeak-ng) at the variant's rate, an odd number of samples long."""
    audio = speech(SENTENCES[sentence], sample_rate=geometry.sample_rate)
    return audio[: int(seconds * geometry.sample_rate) | 1]


def reference_mel(reference: torch.nn.Module, audio: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return reference.feature_extractor(torch.from_numpy(audio)[None])[0].numpy()


def reference_decode(reference: torch.nn.Module, mel: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return reference.decode(torch.from_numpy(mel)[None])[0].numpy()


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max())


def test_each_variant_has_its_own_geometry(variant_checkpoints):
    """The checkpoints the tests serve: the geometries the issue names (the reference packages wrote them)."""
    geometries = {name: checkpoint.geometry for name, checkpoint in variant_checkpoints.items()}
    assert {(g.sample_rate, g.input_channels, g.hop_length, g.padding) for g in geometries.values()} >= {
        (22050, 80, 256, "center"), (44100, 128, 512, "same")}
    layouts = {checkpoint.layout for checkpoint in variant_checkpoints.values()}
    assert layouts == {ck.UPSTREAM, ck.TRANSFORMERS}
    assert any(ck.backbone_shape(cp) == {"dim": 768, "intermediate_dim": 2304, "num_layers": 12}
               for cp in variant_checkpoints.values())


def test_variants_report_the_servers_geometry(client, variant_checkpoints, repository):
    reported = {(v.name, v.kind): v for v in client.variants()}
    assert {("default", "mel"), ("default", "encodec")} <= set(reported)
    for name, checkpoint in variant_checkpoints.items():
        variant = reported[(name, "mel")]
        geometry = checkpoint.geometry
        assert (variant.sample_rate, variant.input_channels, variant.hop_length, variant.n_fft, variant.padding) == (
            geometry.sample_rate, geometry.input_channels, geometry.hop_length, geometry.n_fft, geometry.padding)
        provenance = json.loads((repository / c.variant_model(c.Model.VOCOS_MEL_STREAM, name) / "1" /
                                 "provenance.json").read_text())
        assert variant.lookahead_frames == provenance["parity"]["lookahead_frames"]
        assert set(variant.models) == {c.variant_model(m, name) for m in c.VARIANT_MODELS["mel"]}
        assert client.sample_rate_of(name) == geometry.sample_rate
    assert reported[("default", "mel")].sample_rate == 24000


@pytest.mark.parametrize("index", [0, 1, 2])
def test_offline_equals_the_reference_on_real_speech(client, variant_checkpoints, variant_references, index):
    name = sorted(variant_checkpoints)[index]
    geometry, reference = variant_checkpoints[name].geometry, variant_references[name]
    audio = variant_speech(geometry, 2.0)
    mel = reference_mel(reference, audio)
    expected = reference_decode(reference, mel)
    assert mel.shape == (geometry.input_channels, geometry.frames(audio.shape[0]))
    assert expected.shape == (geometry.waveform_samples(mel.shape[1]),)
    assert max_error(client.synthesize(mel=mel, variant=name), expected) <= PARITY
    # audio in at the variant's rate: mel_features__NAME then vocos_mel__NAME, the reference's own front end
    assert max_error(client.synthesize(audio=audio, sample_rate=geometry.sample_rate, variant=name),
                     expected) <= PARITY


def test_a_ragged_batch_equals_each_item_alone(client, variant_checkpoints, variant_references):
    name = sorted(variant_checkpoints)[1]
    geometry, reference = variant_checkpoints[name].geometry, variant_references[name]
    audio = variant_speech(geometry, 2.5, sentence=4)
    mels = [reference_mel(reference, audio[:n]) for n in (geometry.min_samples, 9_001, 40_003, audio.shape[0])]
    batched = client.synthesize_batch(mels, variant=name, max_concurrency=len(mels))
    for mel, got in zip(mels, batched):
        assert max_error(got, client.synthesize(mel=mel, variant=name)) <= BATCHED
        assert max_error(got, reference_decode(reference, mel)) <= PARITY


@pytest.mark.parametrize("chunk_frames", [1, 7, 40])
def test_streaming_equals_offline_for_any_chunking(client, variant_checkpoints, variant_references, chunk_frames):
    for name in sorted(variant_checkpoints):
        geometry, reference = variant_checkpoints[name].geometry, variant_references[name]
        mel = reference_mel(reference, variant_speech(geometry, 1.2, sentence=5))
        offline = client.synthesize(mel=mel, variant=name)
        pieces = list(client.stream(mel=mel, chunk_frames=chunk_frames, variant=name))
        assert max_error(np.concatenate(pieces), offline) <= BATCHED, name


def test_resampled_audio_comes_back_at_the_variants_rate(client, variant_checkpoints, variant_references):
    """16 kHz audio into a 22.05 kHz and a 44.1 kHz variant: resampled to each one's rate, answered at it."""
    recording = speech(SENTENCES[1], sample_rate=16000)[:20_001]
    for name, checkpoint in variant_checkpoints.items():
        geometry = checkpoint.geometry
        out = client.synthesize(audio=recording, sample_rate=16000, variant=name)
        resampled = round(recording.shape[0] * geometry.sample_rate / 16000)
        assert abs(out.shape[0] - geometry.waveform_samples(geometry.frames(resampled))) <= geometry.hop_length


def test_a_mel_with_the_wrong_bins_is_refused_with_the_variants_bins(client, triton, variant_checkpoints):
    for name, checkpoint in variant_checkpoints.items():
        bins = checkpoint.geometry.input_channels
        with pytest.raises(InvalidInputError, match=rf"^mel: expected {bins} mel bins, got 100"):
            client.synthesize(mel=np.zeros((100, 50), np.float32), variant=name)
        with VocosClient(triton.grpc_url, validate=False, retries=0) as unchecked:  # the server's own answer
            with pytest.raises(InvalidInputError, match=rf"mel.*\b{bins}\b"):
                unchecked.synthesize(mel=np.zeros((100, 50), np.float32), variant=name)


def test_codes_to_a_mel_variant_and_an_unknown_variant_are_refused(client, variant_checkpoints):
    name = sorted(variant_checkpoints)[0]
    with pytest.raises(InvalidInputError):
        client.synthesize(codes=np.zeros((8, 10), np.int64), variant=name)
    with pytest.raises(InvalidInputError, match="no-such-variant"):
        client.synthesize(mel=np.zeros((100, 10), np.float32), variant="no-such-variant")


def test_the_cli_writes_the_variants_rate(triton, variant_checkpoints, tmp_path, capsys):
    name = next(n for n, cp in variant_checkpoints.items() if cp.geometry.sample_rate == 44100)
    wav = tmp_path / "in.wav"
    sf.write(wav, speech(SENTENCES[0], sample_rate=16000)[:16_001], 16000, subtype="PCM_16")
    code = cli_main(["--url", triton.grpc_url, "--variant", name, "resynth", str(wav), "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    info = sf.info(str(tmp_path / "out" / "in.wav"))
    assert info.samplerate == 44100


# -- an EnCodec-conditioned variant: its own backbone and codebooks, EnCodec's shared encoder ----------------
@pytest.fixture(scope="module")
def encodec_variant(encodec_variant_checkpoint, encodec_checkpoint) -> torch.nn.Module:
    return ck.build_reference_vocos(encodec_variant_checkpoint, encodec_checkpoint)


def test_an_encodec_variant_decodes_codes_and_audio_as_the_reference(client, encodec_variant, repository):
    name = ENCODEC_VARIANT
    reported = {(v.name, v.kind): v for v in client.variants()}[(name, "encodec")]
    assert (reported.sample_rate, reported.input_channels, reported.hop_length) == (24000, 128, 320)
    assert tuple(reported.bandwidths) == c.BANDWIDTHS
    assert set(reported.models) == {c.variant_model(m, name) for m in c.VARIANT_MODELS["encodec"]}
    assert not (repository / c.variant_model(c.Model.ENCODEC_ENCODER, name)).exists()  # shared
    audio = speech(SENTENCES[3], sample_rate=24000)[:36_001]
    for kbps in (1.5, 6.0, 12.0):
        codes = ref.encodec_codes(encodec_variant, audio, kbps)
        expected = ref.decode_codes(encodec_variant, codes, kbps)
        assert max_error(client.synthesize(codes=codes, variant=name), expected) <= PARITY
        assert max_error(client.synthesize(audio=audio, sample_rate=24000, bandwidth=kbps, variant=name),
                         ref.encodec_resynthesize(encodec_variant, audio, kbps)) <= PARITY
        streamed = np.concatenate(list(client.stream(codes=codes, chunk_frames=7, variant=name)))
        assert max_error(streamed, client.synthesize(codes=codes, variant=name)) <= BATCHED


# -- build- and start-time refusals -----------------------------------------------------------------
def test_variant_names_are_checked_and_collisions_refused(variant_checkpoints):
    checkpoint = next(iter(variant_checkpoints.values()))
    assert parse_variant("matcha-22k=/models/x") == ("matcha-22k", "/models/x")
    for bad in ("Upper=/x", "a__b=/x", "=x", "name", "-lead=/x"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    with pytest.raises(ValueError, match="twice"):
        check_variants([("a", checkpoint), ("a", checkpoint)])
    with pytest.raises(ValueError, match="reserved"):
        check_variants([("default", checkpoint)])


def test_a_failed_variant_build_leaves_the_previous_repository(tmp_path, variant_checkpoints, mel_checkpoint):
    output = tmp_path / "repo"
    output.mkdir()
    (output / "marker").write_text("previous build")
    name, checkpoint = next(iter(variant_checkpoints.items()))
    broken = ck.VocosCheckpoint(**{**checkpoint.__dict__,
                                   "state_dict": {k: v for k, v in checkpoint.state_dict.items()
                                                  if not k.startswith("head.")}})
    with pytest.raises(ck.CheckpointError):
        build_repository_atomically(output, None, None, None, variants=[(name, broken)])
    assert sorted(p.name for p in output.iterdir()) == ["marker"]
    assert not list(tmp_path.glob(".repo.staging-*"))


def edited_copy(repository: Path, tmp_path: Path, model: str, old: str, new: str) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy, ignore=shutil.ignore_patterns("model.pt", "*.npz", "*.npy"))
    config = copy / model / "config.pbtxt"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    (copy / model / "1" / "model.pt").touch()
    return copy


def test_a_server_refuses_to_start_when_dims_disagree_with_the_artifact(repository, variant_checkpoints, tmp_path):
    name = sorted(variant_checkpoints)[0]
    bins = variant_checkpoints[name].geometry.input_channels
    model = c.variant_model(c.Model.VOCOS_MEL, name)
    copy = edited_copy(repository, tmp_path, model, f"dims: [ {bins}, -1 ]", "dims: [ 100, -1 ]")
    problems = check_repository(copy)
    assert any(f"{model}/config.pbtxt" in p and "mel dims [100, -1]" in p for p in problems), problems
    options = ServerOptions(model_repository=copy, grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=tmp_path / "build")
    with pytest.raises(LaunchError, match="refusing to start"):
        TritonServer(options).start()
    assert check_repository(repository) == []


def test_a_geometry_edited_by_hand_is_refused_naming_the_field(repository, variant_checkpoints, tmp_path):
    name = sorted(variant_checkpoints)[0]
    rate = variant_checkpoints[name].geometry.sample_rate
    model = c.variant_model(c.Model.VOCOS_MEL, name)
    copy = edited_copy(repository, tmp_path, model, f'string_value: "{rate}"', 'string_value: "24000"')
    problems = check_repository(copy)
    assert any("'sample_rate'" in p and str(rate) in p for p in problems), problems
