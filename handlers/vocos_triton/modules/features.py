"""The mel front end as a TorchScript-compatible module over padded, ragged batches.

:class:`MelFeatures` is ``vocos.feature_extractors.MelSpectrogramFeatures`` (torchaudio's centred
``MelSpectrogram``, power 1, HTK mel, then ``safe_log``) using the checkpoint's own window and
filterbank buffers, so serving needs torch but not torchaudio. (The EnCodec front end,
``Vocos.codes_to_features``, needs no torch at all: :mod:`vocos_triton.serving.codebooks`.)
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class MelFeatures(nn.Module):
    """forward(audio (B, L) zero-padded, lengths (B,) samples) -> log-mel (B, n_mels, frames).

    Item b's features are its first ``output_frames(lengths)[b]`` frames: 1 + L // hop with vocos'
    ``center`` padding, (L + 2 pad - n_fft) // hop + 1 with ``same``. Each item is reflect-padded at its
    own ends by ``pad`` (n_fft // 2 centred, (win_length - hop) // 2 same), as the reference pads it alone
    (so items need more than ``pad`` samples).
    """

    def __init__(self, mel_features: nn.Module) -> None:
        super().__init__()
        spectrogram = mel_features.mel_spec.spectrogram
        if mel_features.padding not in ("center", "same") or spectrogram.power != 1.0 or spectrogram.normalized:
            raise ValueError("only the power-1, unnormalised mel of vocos' configs (center or same) is supported")
        self.n_fft: int = spectrogram.n_fft
        self.hop_length: int = spectrogram.hop_length
        self.win_length: int = spectrogram.win_length
        self.centered: bool = mel_features.padding == "center"
        # MelSpectrogramFeatures pads (win_length - hop) // 2 itself with "same", then runs an uncentred STFT
        self.pad: int = self.n_fft // 2 if self.centered else (self.win_length - self.hop_length) // 2
        self.register_buffer("window", spectrogram.window.detach().clone())
        self.register_buffer("filterbank", mel_features.mel_spec.mel_scale.fb.detach().clone())  # (n_freqs, n_mels)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pad = self.pad
        batch, longest = audio.shape
        padded = torch.zeros(batch, longest + 2 * pad, dtype=audio.dtype, device=audio.device)
        for i in range(batch):
            n = int(lengths[i])
            item = audio[i : i + 1, :n].unsqueeze(1)
            padded[i, : n + 2 * pad] = nn.functional.pad(item, (pad, pad), mode="reflect")[0, 0]
        spec = torch.stft(
            padded,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window,
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        ).abs()
        mel = torch.matmul(spec.transpose(-1, -2), self.filterbank).transpose(-1, -2)
        return torch.log(torch.clip(mel, min=1e-7))

    @torch.jit.export
    def output_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        return 1 + torch.div(lengths + 2 * self.pad - self.n_fft, self.hop_length, rounding_mode="floor")

    @torch.jit.export
    def geometry(self) -> Dict[str, int]:
        """What the serving code checks against the model's config.pbtxt (attributes do not survive freezing)."""
        return {"input_channels": self.filterbank.shape[1], "n_fft": self.n_fft, "hop_length": self.hop_length,
                "centered": int(self.centered)}
