"""The mel front end in numpy: ``MelFeatures.forward`` (:mod:`vocos_triton.modules.features`) without torch.

Each item is reflect-padded at its own ends (n_fft // 2 for vocos' ``center`` padding, (n_fft - hop) // 2 for
``same``), cut into frames of n_fft every hop samples,
multiplied by the checkpoint's window, Fourier-transformed (MKL, the FFT torch runs on CPU: see
:mod:`.dfti` for why no other FFT will do), and its magnitudes (power 1) are mapped through the
checkpoint's filterbank, clipped at 1e-7 and logged, all in float32 as torch computes them. Running
this instead of the TorchScript module keeps torch out of the ``mel_features`` stub (see
:class:`vocos_triton.serving.frontend.MelFeaturesModel`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .dfti import RealFft

#: the artifact file of ``mel_features/1/`` beside ``model.pt``: window, filterbank and STFT geometry
MELBANK_FILE = "melbank.npz"
#: ``vocos.spectral_ops.safe_log``'s floor
CLIP = np.float32(1e-7)
#: frames per FFT call: about 1 MB of float32 frames, 2.7 s of 24 kHz audio
BLOCK = 256


class MelBank:
    """audio (L,) float32 -> log-mel (n_mels, frames) float32, for L > ``pad``: 1 + L // hop frames with
    the centred padding (``pad`` = n_fft // 2), (L + 2 pad - n_fft) // hop + 1 with vocos' ``same``.

    ``window`` has ``win_length`` samples (centred in n_fft, as ``torch.stft`` pads it); ``filterbank`` is
    torchaudio's (n_fft // 2 + 1, n_mels) ``MelScale.fb``. ``fft`` defaults to MKL's (:class:`RealFft`).
    """

    def __init__(self, window: np.ndarray, filterbank: np.ndarray, n_fft: int, hop_length: int,
                 win_length: int, fft: Optional[RealFft] = None, pad: Optional[int] = None) -> None:
        if window.shape != (win_length,) or not 0 < win_length <= n_fft:
            raise ValueError(f"window: expected ({win_length},) with win_length <= n_fft={n_fft}, got {window.shape}")
        if filterbank.ndim != 2 or filterbank.shape[0] != n_fft // 2 + 1:
            raise ValueError(f"filterbank: expected ({n_fft // 2 + 1}, n_mels), got {filterbank.shape}")
        self.n_fft, self.hop_length, self.win_length = int(n_fft), int(hop_length), int(win_length)
        self.window = np.ascontiguousarray(window, dtype=np.float32)
        left = (n_fft - win_length) // 2
        self.padded_window = np.zeros(n_fft, np.float32)
        self.padded_window[left : left + win_length] = self.window
        self.filterbank = np.ascontiguousarray(filterbank, dtype=np.float32)
        self.fft = fft or RealFft(self.n_fft)
        #: reflect padding at each end of an item (the centred STFT's by default)
        self.pad = self.n_fft // 2 if pad is None else int(pad)

    @property
    def n_mels(self) -> int:
        return self.filterbank.shape[1]

    def geometry(self) -> Dict[str, int]:
        """What the serving code checks against the model's config.pbtxt, as the TorchScript modules'
        ``geometry()`` says it."""
        return {"input_channels": self.n_mels, "n_fft": self.n_fft, "hop_length": self.hop_length,
                "centered": int(self.pad == self.n_fft // 2)}

    def frames(self, audio: np.ndarray) -> np.ndarray:
        """(L,) -> (frames, n_fft): a read-only view of the reflect-padded item's frames (unwindowed)."""
        if audio.ndim != 1 or audio.shape[0] <= self.pad:
            raise ValueError(f"audio: expected (L,) with L > {self.pad}, got {audio.shape}")
        padded = np.pad(np.asarray(audio, dtype=np.float32), self.pad, mode="reflect")
        return np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[:: self.hop_length]

    def features(self, audio: np.ndarray) -> np.ndarray:
        """One item: (L,) -> (n_mels, frames) float32."""
        frames = self.frames(audio)
        mel = np.empty((frames.shape[0], self.n_mels), np.float32)
        # BLOCK frames at a time: a 60 s item's spectrum would be 23 MB, and the stub keeps what it once
        # allocated (retain_memory_mb); each frame's numbers do not depend on the block it is in
        for start in range(0, frames.shape[0], BLOCK):
            block = frames[start : start + BLOCK] * self.padded_window
            np.matmul(np.abs(self.fft(block)), self.filterbank, out=mel[start : start + BLOCK])
        np.log(np.maximum(mel, CLIP, out=mel), out=mel)
        return np.ascontiguousarray(mel.T)

    def __call__(self, audio: Sequence[np.ndarray]) -> List[np.ndarray]:
        """A ragged batch: each (L_i,) item's (n_mels, frames) log-mel, each computed alone (padding
        buys numpy nothing)."""
        return [self.features(a) for a in audio]

    def save(self, path: Union[str, Path]) -> None:
        np.savez(path, window=self.window, filterbank=self.filterbank,
                 geometry=np.array([self.n_fft, self.hop_length, self.win_length, self.pad], np.int64))

    @classmethod
    def load(cls, path: Union[str, Path], fft: Optional[RealFft] = None) -> MelBank:
        with np.load(path, allow_pickle=False) as saved:
            geometry = [int(v) for v in saved["geometry"]]
            n_fft, hop_length, win_length = geometry[:3]
            pad = geometry[3] if len(geometry) > 3 else None  # files written before "same" padding: centred
            return cls(saved["window"], saved["filterbank"], n_fft, hop_length, win_length, fft, pad)
