"""The TorchScript models of the serving contract (see ``model_repository/``). Two need no torch on
CPU and live elsewhere: ``encodec_embedding`` (:mod:`vocos_triton.serving.embedding`) and ``mel_features``
(:mod:`vocos_triton.serving.frontend`, whose GPU instances run :class:`TorchScriptMelFeatures` from here).

Each ``model_repository/<model>/1/model.py`` imports one class from here as ``TritonPythonModel``.
Limits come from the model's ``parameters`` in config.pbtxt: ``max_seconds`` (default 60),
``max_padded_frames``, ``torch_threads``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import contract as c
from ..contract import Tensor
from .base import Outputs, Row, pad_stack
from .torchscript import TorchScriptModel, load_torchscript
from .windows import Steps, decode_in_windows


@dataclass(frozen=True)
class EncoderRow:
    audio: np.ndarray  # (L,) float32
    bandwidth: c.Bandwidth


@dataclass(frozen=True)
class FeaturesRow:
    features: np.ndarray  # (C, T) float32: log-mel or EnCodec features
    bandwidth_id: int  # 0 for the mel vocoders


def lengths(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(B,) int64 lengths of the last axis."""
    return torch.tensor([a.shape[-1] for a in arrays], dtype=torch.long)


#: the input the vocoders time their Linear kernels on at load: one item of about 4 s
KERNEL_PROBE_SECONDS = 4


def vocoder_probe(geometry: c.Geometry, condition: int) -> Tuple[torch.Tensor, ...]:
    """A vocoder's forward arguments for one random (seeded) item of :data:`KERNEL_PROBE_SECONDS`."""
    frames = geometry.frames(KERNEL_PROBE_SECONDS * geometry.sample_rate)
    features = torch.randn(1, geometry.input_channels, frames, generator=torch.Generator().manual_seed(0))
    return features, torch.tensor([frames]), torch.tensor([condition])


class TorchScriptMelFeatures:
    """``mel_features``' front end on a GPU instance (or a CPU one without MKL, see
    :mod:`vocos_triton.serving.frontend`): ``model.pt``, a TorchScript
    :class:`vocos_triton.modules.features.MelFeatures`, on the instance's device."""

    def __init__(self, args: Dict[str, str], version_dir: str, threads: int, geometry: c.Geometry) -> None:
        self.module, self.device, self.description = load_torchscript(args, version_dir, threads)
        self.geometry = geometry

    def __call__(self, audio: Sequence[np.ndarray]) -> List[np.ndarray]:
        samples = lengths(audio)
        with torch.inference_mode():
            padded = torch.from_numpy(pad_stack(audio)).to(self.device)
            mel = self.module(padded, samples.to(self.device)).cpu().numpy()
        return [mel[i, :, : self.geometry.frames(int(n))] for i, n in enumerate(samples)]


#: padded frames one forward of a batch of long items aims at (config parameter ``step_frames``): about
#: 0.6 s of one core alone, 2 s in a burst; longer batches run in windows (:mod:`.windows`)
STEP_FRAMES = 2048
#: the shortest window (``min_window_frames``): each costs its two contexts (31 frames either side for
#: the charactr backbone, 12 % of 512) on top, so a batch of many long items is not cut finer than this
MIN_WINDOW_FRAMES = 512


class VocoderModel(TorchScriptModel):
    """A vocoder (``vocos_mel``, ``vocos_encodec`` and their variants): features (C, T) [+ bandwidth_id]
    -> waveform; C, the frames-to-samples rule and the limits come from the config's geometry, which the
    artifact must share. A batch of long items runs in windows (:meth:`steps`)."""

    #: the bandwidth id of the warm-up and the kernel probe (the mel vocoders take none)
    probe_condition = 0

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        self.require_geometry()
        loaded = super().load_artifact(args, version_dir)
        if not hasattr(self.module, "geometry"):
            raise ValueError(f"{self.name}: model.pt has no geometry() (exported by an older build); rebuild the "
                             "repository with make repository")
        artifact = self.module.geometry()
        self.check_artifact(artifact, "model.pt")
        # an artifact exported before the windows existed does not say its context: it runs whole batches; so
        # does a GPU instance, whose forward of 60 s items takes milliseconds
        self.context_frames: Optional[int] = (int(artifact["context_frames"])
                                              if "context_frames" in artifact and self.device.type == "cpu" else None)
        return f"{loaded}; {self.geometry.describe()}"

    def configure(self) -> None:
        self.step_frames = int(self.float_parameter("step_frames", STEP_FRAMES))
        self.min_window_frames = int(self.float_parameter("min_window_frames", MIN_WINDOW_FRAMES))

    def steps(self, items: List[FeaturesRow]) -> Steps:
        """The batch in windows of at least ``min_window_frames`` frames, about ``step_frames`` padded frames
        a forward, when its longest item needs more than one; else one forward."""
        lengths = [it.features.shape[1] for it in items]
        window = max(self.min_window_frames, self.step_frames // len(items))
        if self.context_frames is None or max(lengths) <= window + self.context_frames:
            return (yield from super().steps(items))

        def decode(members: List[int], first: int, end: int) -> np.ndarray:
            with torch.inference_mode():
                return self.forward([FeaturesRow(items[i].features[:, first : min(end, lengths[i])],
                                                 items[i].bandwidth_id) for i in members])

        waveforms = yield from decode_in_windows(lengths, decode, window, self.context_frames,
                                                 self.geometry.hop_length, self.geometry.waveform_samples)
        return [None if w is None else {Tensor.WAVEFORM: w} for w in waveforms]

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([FeaturesRow(np.zeros((self.geometry.input_channels, 94), np.float32), self.probe_condition)])

    def kernel_probe(self) -> Tuple[torch.Tensor, ...]:
        return vocoder_probe(self.require_geometry(), self.probe_condition)

    def forward(self, items: List[FeaturesRow]) -> np.ndarray:
        """One padded forward: (B, L) waveforms, item b's audio its first ``waveform_samples(T_b)`` samples."""
        features = [it.features for it in items]
        condition = torch.tensor([it.bandwidth_id for it in items], dtype=torch.long, device=self.device)
        return self.module(self.tensor(pad_stack(features)), lengths(features).to(self.device), condition).cpu().numpy()

    def infer(self, items: List[FeaturesRow]) -> List[Outputs]:
        waveform = self.forward(items)
        return [{Tensor.WAVEFORM: waveform[i, : self.geometry.waveform_samples(it.features.shape[1])]}
                for i, it in enumerate(items)]


class VocosMelModel(VocoderModel):
    """mel (bins, T), T >= the geometry's minimum -> waveform ((T - 1) * hop or T * hop,)."""

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        mel = row[Tensor.MEL]
        self.geometry.validate_features(mel, self.geometry.min_frames, self.limits.max_frames(self.geometry),
                                        Tensor.MEL)
        return mel.shape[1], FeaturesRow(mel, 0)


class VocosEncodecModel(VocoderModel):
    """features (128, T), bandwidth_id (1,) -> waveform (T * 320,)."""

    probe_condition = 2  # 6 kbps

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        features = row[Tensor.FEATURES]
        self.geometry.validate_features(features, self.geometry.min_frames, self.limits.max_frames(self.geometry),
                                        Tensor.FEATURES)
        return features.shape[1], FeaturesRow(features, c.validate_bandwidth_id(row[Tensor.BANDWIDTH_ID]))


class EncodecEncoderModel(TorchScriptModel):
    """audio (L,), bandwidth (1,) kbps -> codes (K, ceil(L / 320)), K = 2/4/8/16."""

    def warm_up(self) -> None:
        geometry = self.require_geometry()
        self.infer([EncoderRow(np.zeros(geometry.sample_rate, np.float32),
                               c.Bandwidth.from_index(len(c.BANDWIDTHS) - 1))])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        audio = row[Tensor.AUDIO]
        bandwidth = c.Bandwidth.parse(row[Tensor.BANDWIDTH])
        self.geometry.validate_audio(audio, self.limits.max_seconds)
        return self.geometry.frames(audio.shape[0]), EncoderRow(audio, bandwidth)

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
            {Tensor.CODES: codes[i, : it.bandwidth.codebooks, : self.geometry.frames(int(n))]}
            for i, (it, n) in enumerate(zip(items, samples))
        ]
