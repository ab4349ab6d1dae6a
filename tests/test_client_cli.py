"""``vocos-client`` against a real tritonserver: wav/npy in, 24 kHz wav out, errors in one line."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from vocos_client import VocosClient
from vocos_client.cli import main
from vocos_triton.launcher.server import free_port
from vocos_triton.speech import SENTENCES, speech

import reference_outputs as ref

PARITY = 1e-4


@pytest.fixture(scope="module")
def speech_wavs(tmp_path_factory) -> dict:
    """Real speech at 16 kHz (16-bit PCM, as most recordings) and 48 kHz (float) in wav files."""
    folder = tmp_path_factory.mktemp("speech-wavs")
    paths = {16000: folder / "sentence_16k.wav", 48000: folder / "sentence_48k.wav"}
    # 1.5 s each keeps the EnCodec reference fast on 2 cores
    sf.write(paths[16000], speech(SENTENCES[3], sample_rate=16000)[:24_000], 16000, subtype="PCM_16")
    sf.write(paths[48000], speech(SENTENCES[4], sample_rate=48000)[:72_000], 48000, subtype="FLOAT")
    return paths


def read_24k(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 24000 and audio.ndim == 1
    return audio


def reference_input(path: Path) -> np.ndarray:
    """What the CLI sends for a wav file: its float samples, soxr-resampled to 24 kHz."""
    audio, rate = sf.read(path, dtype="float32")
    return soxr.resample(audio, rate, 24000, quality="HQ").astype(np.float32)


def run_cli(capsys, *argv: str) -> tuple:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("bandwidth", [None, 6.0])
def test_resynth_speech_at_16k_and_48k(triton, capsys, tmp_path, speech_wavs, reference_mel, reference_encodec,
                                       bandwidth):
    inputs = [speech_wavs[16000], speech_wavs[48000]]
    extra = [] if bandwidth is None else ["--bandwidth", str(bandwidth)]
    code, out, err = run_cli(capsys, "--url", triton.grpc_url, "resynth", *inputs, "-o", tmp_path / "out", *extra)
    assert code == 0, err
    written = [tmp_path / "out" / f"{p.stem}.wav" for p in inputs]
    assert out.split() == [str(p) for p in written]
    for source, target in zip(inputs, written):
        x24 = reference_input(source)
        if bandwidth is None:
            expected = ref.mel_resynthesize(reference_mel, x24)
        else:
            expected = ref.encodec_resynthesize(reference_encodec, x24, bandwidth)
        assert ref.max_error(read_24k(target), expected) <= PARITY


def test_codes_npy_to_wav(triton, capsys, tmp_path, reference_encodec, speech_3s):
    codes = ref.encodec_codes(reference_encodec, speech_3s, 6.0)  # (8, T): Bark-style, 6 kbps
    np.save(tmp_path / "fine_tokens.npy", codes.astype(np.int16))
    code, _, err = run_cli(capsys, "--url", triton.grpc_url, "-q", "codes", tmp_path / "fine_tokens.npy",
                           "-o", tmp_path / "speech.wav")
    assert code == 0 and err == ""
    assert ref.max_error(read_24k(tmp_path / "speech.wav"), ref.decode_codes(reference_encodec, codes, 6.0)) <= PARITY


def test_mel_npy_to_wav(triton, capsys, tmp_path, reference_mel, speech_1s):
    mel = ref.mel_features(reference_mel, speech_1s)
    np.save(tmp_path / "mel.npy", mel)
    # options may also follow the subcommand
    code, _, err = run_cli(capsys, "mel", tmp_path / "mel.npy", "-o", tmp_path / "mel.wav", "--url", triton.grpc_url,
                           "--subtype", "PCM_16")
    assert code == 0, err
    info = sf.info(tmp_path / "mel.wav")
    assert info.samplerate == 24000 and info.channels == 1 and info.subtype == "PCM_16"
    expected = np.clip(ref.mel_decode(reference_mel, mel), -1, 1)
    assert ref.max_error(read_24k(tmp_path / "mel.wav"), expected) <= 2**-14  # 16-bit quantisation


def test_stereo_wav_is_mixed_down(triton, capsys, tmp_path, speech_1s):
    stereo = np.stack([speech_1s, 0.5 * speech_1s], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 24000, subtype="FLOAT")
    sf.write(tmp_path / "mono.wav", stereo.mean(axis=1), 24000, subtype="FLOAT")
    code, _, err = run_cli(capsys, "--url", triton.grpc_url, "-q", "resynth", tmp_path / "stereo.wav",
                           tmp_path / "mono.wav", "-o", tmp_path / "out")
    assert code == 0, err
    assert ref.max_error(read_24k(tmp_path / "out" / "stereo.wav"), read_24k(tmp_path / "out" / "mono.wav")) <= 1e-5


@pytest.mark.parametrize("command", [[], ["resynth"], ["codes"], ["mel"], ["ready"]])
def test_help(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and out.startswith("usage: vocos-client")


def test_ready(triton, capsys):
    assert run_cli(capsys, "--url", triton.grpc_url, "ready")[0] == 0
    code, _, err = run_cli(capsys, "--url", f"127.0.0.1:{free_port()}", "--retries", "0", "ready")
    assert code == 3 and err.count("\n") == 1


# -- errors: one line, exit 2 (invalid input), 3 (unavailable), 1 (other) ------------------------------
def test_invalid_input_names_the_file(triton, capsys, tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((100, 20), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((80, 20), np.float32))
    code, out, err = run_cli(capsys, "--url", triton.grpc_url, "mel", tmp_path / "good.npy", tmp_path / "bad.npy",
                             "-o", tmp_path / "out")
    assert code == 2 and out == ""
    assert err == f"vocos-client: error: {tmp_path / 'bad.npy'}: mel: expected 100 mel bins, got 80\n"
    assert not (tmp_path / "out").exists()  # nothing is written unless every input succeeds


@pytest.mark.parametrize("argv, message", [
    (["mel", "missing.npy", "-o", "x.wav"], "missing.npy: cannot read a .npy array"),
    (["resynth", "missing.wav", "-o", "x.wav"], "missing.wav: cannot read audio"),
    (["mel", "a.npy"], "the following arguments are required: -o/--output"),
    (["mel", "a.npy", "b.npy", "-o", "x.wav"], "2 inputs need an output directory"),
    (["resynth", "a.wav", "-o", "x.wav", "--bandwidth", "5"], None),
    (["frobnicate"], "argument {resynth,codes,mel,ready}: invalid choice"),
])
def test_usage_errors_exit_2_in_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "a.wav", np.zeros(2400, np.float32), 24000)
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, np.zeros((100, 5), np.float32))
    code, out, err = run_cli(capsys, "--url", f"127.0.0.1:{free_port()}", "--retries", "0", *argv)
    assert code == 2 and out == ""
    assert err.startswith("vocos-client: error: ") and err.count("\n") == 1, err
    assert message is None or message in err
    if message is None:
        assert "bandwidth: expected one of 1.5, 3, 6, 12 kbps, got 5" in err


def test_server_down_exits_3_from_the_installed_script(tmp_path):
    np.save(tmp_path / "mel.npy", np.zeros((100, 20), np.float32))
    script = Path(sys.executable).with_name("vocos-client")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vocos_client.cli"]
    run = subprocess.run([*command, "--url", f"127.0.0.1:{free_port()}", "--retries", "1", "--timeout", "10",
                          "mel", str(tmp_path / "mel.npy"), "-o", str(tmp_path / "out.wav")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vocos-client: error: ") and "2 attempts" in lines[0], run.stderr
    assert not (tmp_path / "out.wav").exists()


# -- --stream: progressive wav, time to first audio ------------------------------------------------------
@pytest.mark.parametrize("chunk_frames", [None, 7])
def test_stream_mel_and_codes_write_the_same_audio_as_offline(triton, capsys, tmp_path, reference_mel, speech_1s,
                                                              chunk_frames):
    mel = ref.mel_features(reference_mel, speech_1s)
    codes = np.random.default_rng(0).integers(0, 1024, size=(4, 60)).astype(np.int16)  # 3 kbps from K
    np.save(tmp_path / "mel.npy", mel)
    np.save(tmp_path / "codes.npy", codes)
    extra = [] if chunk_frames is None else ["--chunk-frames", str(chunk_frames)]
    for command, source in (("mel", "mel.npy"), ("codes", "codes.npy")):
        code, out, err = run_cli(capsys, "--url", triton.grpc_url, command, tmp_path / source, "-o",
                                 tmp_path / "streamed", "--stream", *extra)
        assert code == 0, err
        assert out.split() == [str(tmp_path / "streamed" / f"{Path(source).stem}.wav")]
        # one line per input: the time to first audio and how much audio came in how long
        assert re.fullmatch(rf"{re.escape(str(tmp_path / source))}: first audio after \d+\.\d ms; "
                            r"\d+\.\d\d s of audio in \d+\.\d\d s\n", err), err
        code, _, err = run_cli(capsys, "--url", triton.grpc_url, "-q", command, tmp_path / source, "-o",
                               tmp_path / "offline")
        assert code == 0, err
        streamed = read_24k(tmp_path / "streamed" / f"{Path(source).stem}.wav")
        assert ref.max_error(streamed, read_24k(tmp_path / "offline" / f"{Path(source).stem}.wav")) <= 1e-5


def test_stream_failure_leaves_no_partial_file(triton, capsys, tmp_path):
    good = np.random.default_rng(1).standard_normal((100, 300)).astype(np.float32)
    bad = good.copy()
    bad[3, 200] = np.nan  # in the fourth 64-frame chunk: found before sending, named as the server would
    np.save(tmp_path / "good.npy", good)
    np.save(tmp_path / "bad.npy", bad)
    code, out, err = run_cli(capsys, "--url", triton.grpc_url, "mel", tmp_path / "good.npy", tmp_path / "bad.npy",
                             "-o", tmp_path / "out", "--stream", "--chunk-frames", "64", "--subtype", "PCM_16")
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == (f"vocos-client: error: {tmp_path / 'bad.npy'}: mel: expected finite values, "
                                    "got NaN at index [3, 8]")
    assert sf.info(tmp_path / "out" / "good.wav").frames == 299 * 256  # inputs before the failure are kept
    assert not (tmp_path / "out" / "bad.wav").exists()


def test_chunk_frames_needs_stream(capsys, tmp_path):
    np.save(tmp_path / "mel.npy", np.zeros((100, 5), np.float32))
    code, _, err = run_cli(capsys, "--url", f"127.0.0.1:{free_port()}", "mel", tmp_path / "mel.npy", "-o",
                           tmp_path / "x.wav", "--chunk-frames", "4")
    assert code == 2 and "--chunk-frames applies only with --stream" in err


# -- variants (offline: a stand-in for the server's answers) ----------------------------------------------
class FakeServerClient(VocosClient):
    """The CLI's client, answered by test_client_offline's FakeTriton (SERVER: the default variant, a 22.05 kHz
    80-bin mel variant ``matcha-22k``, an EnCodec variant ``bark``); streams yield one 0.5 s piece."""

    fake = None

    def _open(self) -> None:
        super()._open()
        self._client.close()
        self._client = type(self).fake

    def stream(self, **kwargs):
        type(self).fake.calls.append(("stream", kwargs.get("variant")))
        return iter([np.zeros(int(self.sample_rate_of(kwargs.get("variant")) / 2), np.float32)])


@pytest.fixture
def fake_server(monkeypatch):
    from test_client_offline import SERVER, FakeTriton

    from vocos_client import cli

    FakeServerClient.fake = FakeTriton(SERVER)
    monkeypatch.setattr(cli, "VocosClient", FakeServerClient)
    return FakeServerClient.fake


def test_list_variants(capsys, fake_server):
    code, out, err = run_cli(capsys, "--list-variants")
    assert code == 0 and err == ""
    assert [line.split() for line in out.splitlines()] == [
        ["default", "encodec", "24000", "Hz", "128", "ch", "hop", "320", "same", "lookahead", "29", "bandwidths",
         "1.5,3,6,12"],
        ["default", "mel", "24000", "Hz", "100", "ch", "hop", "256", "center", "lookahead", "29", "bandwidths", "-"],
        ["bark", "encodec", "24000", "Hz", "128", "ch", "hop", "320", "same", "lookahead", "-", "bandwidths", "6"],
        ["matcha-22k", "mel", "22050", "Hz", "80", "ch", "hop", "256", "center", "lookahead", "12", "bandwidths", "-"],
    ]
    assert len({line.index("Hz") for line in out.splitlines()}) == 1  # aligned columns


def test_variant_output_is_written_at_the_variants_rate(capsys, tmp_path, fake_server):
    np.save(tmp_path / "mel80.npy", np.zeros((80, 20), np.float32))
    code, out, err = run_cli(capsys, "mel", tmp_path / "mel80.npy", "-o", tmp_path / "offline.wav", "--variant",
                             "matcha-22k")
    assert code == 0, err
    assert sf.info(tmp_path / "offline.wav").samplerate == 22050
    assert ("infer", "vocos_mel__matcha-22k", {"mel": (1, 80, 20)}) in fake_server.calls
    code, out, err = run_cli(capsys, "--variant", "matcha-22k", "mel", tmp_path / "mel80.npy", "-o",
                             tmp_path / "streamed.wav", "--stream")
    assert code == 0, err
    assert sf.info(tmp_path / "streamed.wav").samplerate == 22050 and sf.info(tmp_path / "streamed.wav").frames == 11025
    assert ("stream", "matcha-22k") in fake_server.calls and "0.50 s of audio" in err
    # audio in: resampled by the client to the variant's rate
    sf.write(tmp_path / "in16k.wav", np.zeros(16000, np.float32), 16000)
    code, out, err = run_cli(capsys, "-q", "resynth", tmp_path / "in16k.wav", "-o", tmp_path / "resynth.wav",
                             "--variant", "matcha-22k")
    assert code == 0, err
    assert ("infer", "resynthesize_mel__matcha-22k", {"audio": (1, 22050)}) in fake_server.calls
    # an EnCodec variant: codes in, its rate out; a bandwidth it does not serve is refused before sending
    np.save(tmp_path / "codes.npy", np.zeros((8, 20), np.int16))
    code, out, err = run_cli(capsys, "-q", "codes", tmp_path / "codes.npy", "-o", tmp_path / "bark.wav", "--variant",
                             "bark")
    assert code == 0, err
    assert sf.info(tmp_path / "bark.wav").samplerate == 24000
    # looked up once (the rate to write at comes from the same lookup)
    assert fake_server.calls[-2:] == [("config", "vocos_encodec__bark"),
                                      ("infer", "decode_codes__bark", {"codes": (1, 8, 20), "bandwidth": (1, 1)})]
    np.save(tmp_path / "codes4.npy", np.zeros((4, 20), np.int16))
    code, out, err = run_cli(capsys, "codes", tmp_path / "codes4.npy", "-o", tmp_path / "x.wav", "--variant", "bark")
    assert code == 2 and "codes: 4 codebooks are 3 kbps, which this model does not serve; it serves 6 kbps" in err


@pytest.mark.parametrize("argv, message", [
    (["mel", "mel80.npy", "-o", "x.wav", "--variant", "nope"],
     "mel80.npy: variant: the server has no mel variant 'nope' (no model vocos_mel__nope); it has: "
     "default (mel, encodec), bark (encodec), matcha-22k (mel)"),
    (["mel", "mel80.npy", "-o", "x.wav", "--variant", "nope", "--stream"],
     "variant: the server has no mel variant 'nope'"),
    (["mel", "mel80.npy", "-o", "x.wav", "--variant", "Bad Name"], "variant name 'Bad Name': expected lower-case"),
    (["mel", "mel80.npy", "-o", "x.wav"], "mel80.npy: mel: expected 100 mel bins, got 80"),
    (["--list-variants", "ready"], "--list-variants takes no command (got ready)"),
    ([], "the following arguments are required: {resynth,codes,mel,ready}"),
])
def test_variant_errors_exit_2_in_one_line(capsys, tmp_path, monkeypatch, fake_server, argv, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "mel80.npy", np.zeros((80, 20), np.float32))
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("vocos-client: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "x.wav").exists()
