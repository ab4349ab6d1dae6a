"""The four TorchScript models of the serving contract (see ``model_repository/``); the fifth,
``encodec_embedding``, needs no torch and lives in :mod:`vocos_triton.serving.embedding`.

Each ``model_repository/<model>/1/model.py`` imports one class from here as ``TritonPythonModel``.
Limits come from the model's ``parameters`` in config.pbtxt: ``max_seconds`` (default 60),
``max_padded_frames``, ``torch_threads``.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch

from .. import contract as c
from .base import Row, pad_stack
from .torchscript import TorchScriptModel

#: reflect padding of n_fft // 2 = 512 needs more samples than that (torch.stft, vocos 0.1.0)
MEL_MIN_SAMPLES = 513


def _lengths(items: List[Dict[str, Any]], key: str) -> torch.Tensor:
    return torch.tensor([item[key].shape[-1] for item in items], dtype=torch.long)


class MelFeaturesModel(TorchScriptModel):
    """audio (L,) -> mel (100, 1 + L // 256)."""

    def configure(self) -> None:
        self.max_samples = c.max_samples(self.max_seconds)

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([{"audio": np.zeros(c.SAMPLE_RATE, np.float32)}])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        audio = row["audio"]
        c.validate_audio(audio, MEL_MIN_SAMPLES, self.max_samples)
        return c.mel_frames(audio.shape[0]), {"audio": audio}

    def infer(self, items: List[Dict[str, Any]]) -> List[Dict[str, np.ndarray]]:
        lengths = _lengths(items, "audio")
        mel = self.module(self.tensor(pad_stack([it["audio"] for it in items])), lengths.to(self.device)).cpu().numpy()
        return [{"mel": mel[i, :, : c.mel_frames(int(n))]} for i, n in enumerate(lengths)]


class VocosMelModel(TorchScriptModel):
    """mel (100, T), T >= 2 -> waveform ((T - 1) * 256,)."""

    min_frames = 2

    def configure(self) -> None:
        self.max_frames = c.mel_frames(c.max_samples(self.max_seconds))

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([{"mel": np.zeros((c.MEL_BINS, 94), np.float32)}])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        mel = row["mel"]
        c.validate_mel(mel, self.min_frames, self.max_frames)
        return mel.shape[1], {"mel": mel}

    def infer(self, items: List[Dict[str, Any]]) -> List[Dict[str, np.ndarray]]:
        frames = _lengths(items, "mel").to(self.device)
        condition = torch.zeros_like(frames)
        waveform = self.module(self.tensor(pad_stack([it["mel"] for it in items])), frames, condition).cpu().numpy()
        return [{"waveform": waveform[i, : c.mel_waveform_samples(int(n))]} for i, n in enumerate(frames)]


class EncodecEncoderModel(TorchScriptModel):
    """audio (L,), bandwidth (1,) kbps -> codes (K, ceil(L / 320)), K = 2/4/8/16."""

    min_samples = 1

    def configure(self) -> None:
        self.max_samples = c.max_samples(self.max_seconds)

    def warm_up(self) -> None:
        self.infer([{"audio": np.zeros(c.SAMPLE_RATE, np.float32), "codebooks": 16}])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        audio = row["audio"]
        codebooks = c.codebooks_for_bandwidth(c.scalar_bandwidth(row["bandwidth"]))
        c.validate_audio(audio, self.min_samples, self.max_samples)
        return c.encodec_frames(audio.shape[0]), {"audio": audio, "codebooks": codebooks}

    def check_request(self, rows: List[Row]) -> None:
        if len({data["codebooks"] for _, data in rows}) > 1:
            raise c.InvalidInput("bandwidth", "expected one bandwidth for all rows of a request (codes share K)")

    def infer(self, items: List[Dict[str, Any]]) -> List[Dict[str, np.ndarray]]:
        lengths = _lengths(items, "audio")
        codebooks = torch.tensor([it["codebooks"] for it in items], dtype=torch.long)
        codes = self.module(
            self.tensor(pad_stack([it["audio"] for it in items])), lengths.to(self.device), codebooks.to(self.device)
        ).cpu().numpy()
        return [
            {"codes": codes[i, : it["codebooks"], : c.encodec_frames(int(n))]}
            for i, (it, n) in enumerate(zip(items, lengths))
        ]


class VocosEncodecModel(TorchScriptModel):
    """features (128, T), bandwidth_id (1,) -> waveform (T * 320,)."""

    min_frames = 1

    def configure(self) -> None:
        self.max_frames = c.encodec_frames(c.max_samples(self.max_seconds))

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([{"features": np.zeros((c.FEATURE_DIM, 75), np.float32), "bandwidth_id": 2}])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        features = row["features"]
        c.validate_features(features, self.min_frames, self.max_frames)
        return features.shape[1], {"features": features, "bandwidth_id": c.validate_bandwidth_id(row["bandwidth_id"])}

    def infer(self, items: List[Dict[str, Any]]) -> List[Dict[str, np.ndarray]]:
        frames = _lengths(items, "features").to(self.device)
        condition = torch.tensor([it["bandwidth_id"] for it in items], dtype=torch.long, device=self.device)
        waveform = self.module(self.tensor(pad_stack([it["features"] for it in items])), frames, condition)
        waveform = waveform.cpu().numpy()
        return [{"waveform": waveform[i, : c.encodec_waveform_samples(int(n))]} for i, n in enumerate(frames)]
