"""Real (synthesised) speech for tests, benchmarks and load tests: espeak-ng, resampled to 24 kHz.

espeak-ng is a formant synthesiser, so the clips are license-clean, reproducible and made on the
spot; they are speech (voicing, fricatives, pauses), which noise and sines are not.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .contract import MEL_24KHZ

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A neural vocoder turns spectral features back into a waveform.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
)


class SpeechUnavailable(RuntimeError):
    """espeak-ng is not installed (``make system-deps`` installs it)."""


@functools.lru_cache(maxsize=64)
def _espeak(text: str, voice: str, words_per_minute: int) -> np.ndarray:
    import soundfile as sf
    import soxr

    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SpeechUnavailable("espeak-ng is not installed: run `make system-deps` (apt-get install espeak-ng sox)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([binary, "-v", voice, "-s", str(words_per_minute), "-w", str(wav), text],
                       check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    return soxr.resample(audio, rate, MEL_24KHZ.sample_rate).astype(np.float32)


def speech(text: str = SENTENCES[0], voice: str = "en-us", words_per_minute: int = 160,
           sample_rate: int = MEL_24KHZ.sample_rate) -> np.ndarray:
    """One utterance as float32 mono audio in [-1, 1] at ``sample_rate``."""
    audio = _espeak(text, voice, words_per_minute)
    if sample_rate != MEL_24KHZ.sample_rate:
        import soxr

        audio = soxr.resample(audio, MEL_24KHZ.sample_rate, sample_rate).astype(np.float32)
    return audio.copy()


def speech_clip(num_samples: int, seed: int = 0) -> np.ndarray:
    """Exactly ``num_samples`` samples (24 kHz) of running speech, different per ``seed``."""
    voices = ("en-us", "en-gb", "en-us+f3", "en-us+m3")
    pieces, total, i = [], 0, seed
    while total < num_samples:
        piece = speech(SENTENCES[i % len(SENTENCES)], voices[(i // len(SENTENCES) + seed) % len(voices)])
        pieces.append(piece)
        total += piece.shape[0]
        i += 1
    clip = np.concatenate(pieces)[:num_samples]
    return np.ascontiguousarray(clip, dtype=np.float32)
