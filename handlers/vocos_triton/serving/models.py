"""The TorchScript models of the serving contract (see ``model_repository/``). Two need no torch on
CPU and live elsewhere: ``encodec_embedding`` (:mod:`vocos_triton.serving.embedding`) and ``mel_features``
(:mod:`vocos_triton.serving.frontend`, whose GPU instances run :class:`TorchScriptMelFeatures` from here).

Each ``model_repository/<model>/1/model.py`` imports one class from here as ``TritonPythonModel``.
Limits come from the model's ``parameters`` in config.pbtxt: ``max_seconds`` (default 60),
``max_padded_frames``, ``torch_threads``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .. import contract as c
from ..contract import Tensor
from .base import Outputs, Row, pad_stack
from .torchscript import TorchScriptModel, load_torchscript


@dataclass(frozen=True)
class EncoderRow:
    audio: np.ndarray  # (L,) float32
    bandwidth: c.Bandwidth


@dataclass(frozen=True)
class MelRow:
    mel: np.ndarray  # (100, T) float32


@dataclass(frozen=True)
class FeaturesRow:
    features: np.ndarray  # (128, T) float32
    bandwidth_id: int


def lengths(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(B,) int64 lengths of the last axis."""
    return torch.tensor([a.shape[-1] for a in arrays], dtype=torch.long)


#: the input the vocoders time their Linear kernels on at load: one item of about 4 s
KERNEL_PROBE_SECONDS = 4


def _vocoder_probe(channels: int, frames: int, condition: int) -> Tuple[torch.Tensor, ...]:
    """A vocoder's forward arguments for one random (seeded) item of ``frames`` frames."""
    features = torch.randn(1, channels, frames, generator=torch.Generator().manual_seed(0))
    return features, torch.tensor([frames]), torch.tensor([condition])


def mel_vocoder_probe() -> Tuple[torch.Tensor, ...]:
    return _vocoder_probe(c.MEL_BINS, c.mel_frames(KERNEL_PROBE_SECONDS * c.SAMPLE_RATE), 0)


def encodec_vocoder_probe() -> Tuple[torch.Tensor, ...]:
    return _vocoder_probe(c.FEATURE_DIM, c.encodec_frames(KERNEL_PROBE_SECONDS * c.SAMPLE_RATE), 2)


class TorchScriptMelFeatures:
    """``mel_features``' front end on a GPU instance (or a CPU one without MKL, see
    :mod:`vocos_triton.serving.frontend`): ``model.pt``, a TorchScript
    :class:`vocos_triton.modules.features.MelFeatures`, on the instance's device."""

    def __init__(self, args: Dict[str, str], version_dir: str, threads: int) -> None:
        self.module, self.device, self.description = load_torchscript(args, version_dir, threads)

    def __call__(self, audio: Sequence[np.ndarray]) -> List[np.ndarray]:
        samples = lengths(audio)
        with torch.inference_mode():
            padded = torch.from_numpy(pad_stack(audio)).to(self.device)
            mel = self.module(padded, samples.to(self.device)).cpu().numpy()
        return [mel[i, :, : c.mel_frames(int(n))] for i, n in enumerate(samples)]


class VocosMelModel(TorchScriptModel):
    """mel (100, T), T >= 2 -> waveform ((T - 1) * 256,)."""

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([MelRow(np.zeros((c.MEL_BINS, 94), np.float32))])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        mel = row[Tensor.MEL]
        c.validate_mel(mel, c.MEL_MIN_FRAMES, self.limits.max_mel_frames)
        return mel.shape[1], MelRow(mel)

    def kernel_probe(self) -> Tuple[torch.Tensor, ...]:
        return mel_vocoder_probe()

    def infer(self, items: List[MelRow]) -> List[Outputs]:
        mels = [it.mel for it in items]
        frames = lengths(mels).to(self.device)
        condition = torch.zeros_like(frames)
        waveform = self.module(self.tensor(pad_stack(mels)), frames, condition).cpu().numpy()
        return [{Tensor.WAVEFORM: waveform[i, : c.mel_waveform_samples(int(n))]} for i, n in enumerate(frames)]


class EncodecEncoderModel(TorchScriptModel):
    """audio (L,), bandwidth (1,) kbps -> codes (K, ceil(L / 320)), K = 2/4/8/16."""

    def warm_up(self) -> None:
        self.infer([EncoderRow(np.zeros(c.SAMPLE_RATE, np.float32), c.Bandwidth.from_index(len(c.BANDWIDTHS) - 1))])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        audio = row[Tensor.AUDIO]
        bandwidth = c.Bandwidth.parse(row[Tensor.BANDWIDTH])
        c.validate_audio(audio, c.ENCODEC_MIN_SAMPLES, self.limits.max_samples)
        return c.encodec_frames(audio.shape[0]), EncoderRow(audio, bandwidth)

    def check_request(self, rows: List[Row]) -> None:
        if len({row.bandwidth for _, row in rows}) > 1:
            raise c.InvalidInput(Tensor.BANDWIDTH, "expected one bandwidth for all rows of a request (codes share K)")

    def infer(self, items: List[EncoderRow]) -> List[Outputs]:
        audio = [it.audio for it in items]
        samples = lengths(audio)
        codebooks = torch.tensor([it.bandwidth.codebooks for it in items], dtype=torch.long)
        codes = self.module(
            self.tensor(pad_stack(audio)), samples.to(self.device), codebooks.to(self.device)
        ).cpu().numpy()
        return [
            {Tensor.CODES: codes[i, : it.bandwidth.codebooks, : c.encodec_frames(int(n))]}
            for i, (it, n) in enumerate(zip(items, samples))
        ]


class VocosEncodecModel(TorchScriptModel):
    """features (128, T), bandwidth_id (1,) -> waveform (T * 320,)."""

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([FeaturesRow(np.zeros((c.FEATURE_DIM, 75), np.float32), 2)])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        features = row[Tensor.FEATURES]
        c.validate_features(features, c.FEATURES_MIN_FRAMES, self.limits.max_code_frames)
        return features.shape[1], FeaturesRow(features, c.validate_bandwidth_id(row[Tensor.BANDWIDTH_ID]))

    def kernel_probe(self) -> Tuple[torch.Tensor, ...]:
        return encodec_vocoder_probe()

    def infer(self, items: List[FeaturesRow]) -> List[Outputs]:
        features = [it.features for it in items]
        frames = lengths(features).to(self.device)
        condition = torch.tensor([it.bandwidth_id for it in items], dtype=torch.long, device=self.device)
        waveform = self.module(self.tensor(pad_stack(features)), frames, condition).cpu().numpy()
        return [{Tensor.WAVEFORM: waveform[i, : c.encodec_waveform_samples(int(n))]} for i, n in enumerate(frames)]
