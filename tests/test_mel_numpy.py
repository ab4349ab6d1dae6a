"""The numpy mel front end (``mel_features`` on CPU instances) against the TorchScript module and the
reference ``vocos`` feature extractor, on real speech: odd lengths, pauses, empty bands, a quiet clip.

It must equal both to 1e-5, also in near-silent bins, where a bin's value is the FFT's float32
rounding noise: that holds only with the FFT torch itself runs (MKL, see :mod:`vocos_triton.serving.dfti`).
"""
from __future__ import annotations

import json
import subprocess
from typing import List

import numpy as np
import pytest
import soxr
import torch

from vocos_triton.contract import MEL_24KHZ, Model
from vocos_triton.launcher.runtime import default_runtime_python, runtime_environment
from vocos_triton.modules.features import MelFeatures
from vocos_triton.serving import dfti
from vocos_triton.serving.melbank import MELBANK_FILE, MelBank
from vocos_triton.speech import speech_clip

import reference_outputs as ref

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def module(reference_mel) -> MelFeatures:
    return MelFeatures(reference_mel.feature_extractor).eval()


@pytest.fixture(scope="module")
def bank(module) -> MelBank:
    if not dfti.available():
        pytest.skip("no MKL runtime here (the `mkl` wheel)")
    return MelBank(module.window.numpy(), module.filterbank.numpy(), module.n_fft, module.hop_length,
                   module.win_length)


def _band_limited(n: int, seed: int, rate: int = 16_000) -> np.ndarray:
    """Speech as a 16 kHz recording brings it: nothing above 8 kHz, a third of the mel bands empty."""
    low = soxr.resample(speech_clip(n, seed=seed), 24_000, rate)
    return soxr.resample(low, rate, 24_000).astype(np.float32)[:n]


@pytest.fixture(scope="module")
def clips() -> List[np.ndarray]:
    """Odd lengths (none a multiple of the hop), the shortest allowed (513), pauses between sentences,
    a band-limited clip and a very quiet one (-80 dB)."""
    speech = [speech_clip(n, seed=i) for i, n in enumerate([513, 7_777, 24_007, 50_001, 120_001])]
    return speech + [_band_limited(36_001, seed=7), speech_clip(30_001, seed=4) * np.float32(1e-4)]


def _script(module, audio: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(audio)[None], torch.tensor([audio.shape[0]]))[0].numpy()


def test_the_clips_have_bins_that_only_the_same_fft_reproduces(module, reference_mel, clips):
    """Why the FFT must be torch's: numpy's own (float64) FFT is off by far more than the tolerance."""
    worst = 0.0
    for audio in clips:
        half = module.n_fft // 2
        frames = np.lib.stride_tricks.sliding_window_view(np.pad(audio, half, mode="reflect"), module.n_fft)
        spectrum = np.abs(np.fft.rfft(frames[:: module.hop_length] * module.window.numpy().astype(np.float64)))
        mel = np.log(np.maximum(spectrum @ module.filterbank.numpy().astype(np.float64), 1e-7)).T
        worst = max(worst, ref.max_error(mel, ref.mel_features(reference_mel, audio)))
    assert worst > 1e-2


def test_numpy_front_end_equals_torchscript_and_reference(bank, module, reference_mel, clips):
    scripted = torch.jit.script(module)
    for audio in clips:
        mel = bank.features(audio)
        assert mel.dtype == np.float32 and mel.shape == (100, MEL_24KHZ.frames(audio.shape[0]))
        assert ref.max_error(mel, ref.mel_features(reference_mel, audio)) <= TOLERANCE
        assert ref.max_error(mel, _script(scripted, audio)) <= TOLERANCE


def test_ragged_batch_equals_each_item_alone(bank, clips):
    batch = bank(clips[::-1])
    for audio, mel in zip(clips[::-1], batch):
        assert ref.max_error(mel, bank.features(audio)) <= TOLERANCE


def test_silence_is_the_log_floor(bank):
    mel = bank.features(np.zeros(4_000, np.float32))
    assert np.all(mel == np.log(np.float32(1e-7)))


def test_audio_the_reflect_pad_cannot_take_is_refused(module):
    bank = MelBank(module.window.numpy(), module.filterbank.numpy(), module.n_fft, module.hop_length,
                   module.win_length, fft=lambda frames: frames)  # never reached
    with pytest.raises(ValueError, match="L > 512"):
        bank.frames(np.zeros(512, np.float32))


def test_export_writes_the_checkpoint_buffers_and_their_parity(repository, module):
    """``melbank.npz`` holds the buffers ``MelFeatures`` uses; provenance carries its parity."""
    version = repository / Model.MEL_FEATURES / "1"
    numpy_parity = json.loads((version / "provenance.json").read_text())["parity"]["numpy"]
    if not dfti.available():
        assert "mkl" in numpy_parity["skipped"] and not (version / MELBANK_FILE).exists()
        pytest.skip("exported without MKL: no melbank.npz")
    assert numpy_parity["file"] == MELBANK_FILE and "Math Kernel Library" in numpy_parity["fft"]
    assert numpy_parity["max_abs_error_vs_reference"] <= TOLERANCE
    saved = MelBank.load(version / MELBANK_FILE)
    assert np.array_equal(saved.window, module.window.numpy())
    assert np.array_equal(saved.filterbank, module.filterbank.numpy())
    assert (saved.n_fft, saved.hop_length, saved.win_length) == (module.n_fft, module.hop_length, module.win_length)


def test_the_runtime_computes_the_reference_mel_without_torch(repository, reference_mel, clips, tmp_path):
    """In the serving runtime, as the stub does: load the artifact, compute, and never import torch."""
    version = repository / Model.MEL_FEATURES / "1"
    if not (version / MELBANK_FILE).exists():
        pytest.skip("exported without MKL: no melbank.npz")
    np.savez(tmp_path / "clips.npz", *clips)
    probe = f"""
import json, sys
import numpy as np
from vocos_triton.serving import dfti
if not dfti.available():
    print(json.dumps(None)); sys.exit()
from vocos_triton.serving.melbank import MelBank
bank = MelBank.load({str(version / MELBANK_FILE)!r})
with np.load({str(tmp_path / "clips.npz")!r}) as saved:
    clips = [saved[f"arr_{{i}}"] for i in range(len(saved.files))]
np.savez({str(tmp_path / "mels.npz")!r}, *bank(clips))
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""
    result = subprocess.run([str(default_runtime_python()), "-c", probe], capture_output=True, text=True,
                            env=runtime_environment(), timeout=120, check=True)
    torch_modules = json.loads(result.stdout.strip().splitlines()[-1])
    if torch_modules is None:
        pytest.skip("the serving runtime has no MKL: its CPU instances serve model.pt")
    assert torch_modules == []
    with np.load(tmp_path / "mels.npz") as mels:
        for i, audio in enumerate(clips):
            assert ref.max_error(mels[f"arr_{i}"], ref.mel_features(reference_mel, audio)) <= TOLERANCE
