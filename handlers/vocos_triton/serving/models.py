"""The TorchScript models of the serving contract (see ``model_repository/``). Two need no torch on
CPU and live elsewhere: ``encodec_embedding`` (:mod:`vocos_triton.serving.embedding`) and ``mel_features``
(:mod:`vocos_triton.serving.frontend`).

Importing this module imports no torch: each model's ``model.pt`` runs where :func:`.scripts.open_script`
puts it (on CPU, a worker the torch host forked for the stub; see :mod:`.torch_host`).

Each ``model_repository/<model>/1/model.py`` imports one class from here as ``TritonPythonModel``.
Limits come from the model's ``parameters`` in config.pbtxt: ``max_seconds`` (default 60),
``max_padded_frames``, ``torch_threads``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import contract as c
from ..contract import Tensor
from .allocator import IDLE_RELEASE_S
from .base import Outputs, RaggedBatchModel, Row, pad_stack, server_log
from .scripts import RemoteScript, WorkerLost, open_script
from .windows import Steps, decode_in_windows


@dataclass(frozen=True)
class EncoderRow:
    audio: np.ndarray  # (L,) float32
    bandwidth: c.Bandwidth


@dataclass(frozen=True)
class FeaturesRow:
    features: np.ndarray  # (C, T) float32: log-mel or EnCodec features
    bandwidth_id: int  # 0 for the mel vocoders


def lengths(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """(B,) int64 lengths of the last axis."""
    return np.array([a.shape[-1] for a in arrays], dtype=np.int64)


#: the input the vocoders time their Linear kernels on at load: one item of about 4 s
KERNEL_PROBE_SECONDS = 4


def vocoder_probe(geometry: c.Geometry, condition: int) -> Tuple[np.ndarray, ...]:
    """A vocoder's forward arguments for one random (seeded) item of :data:`KERNEL_PROBE_SECONDS`."""
    frames = geometry.frames(KERNEL_PROBE_SECONDS * geometry.sample_rate)
    features = np.random.default_rng(0).standard_normal((1, geometry.input_channels, frames), dtype=np.float32)
    return features, np.array([frames], dtype=np.int64), np.array([condition], dtype=np.int64)


class ScriptModel(RaggedBatchModel):
    """A model whose forward is ``<version>/model.pt``, run where :func:`.scripts.open_script` puts it;
    ``torch_threads`` (config) > 0 sets the intra-op threads (0: torch's default, one per core)."""

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        self.on_gpu = args.get("model_instance_kind") == "GPU"
        self.script: Any = open_script(
            args, version_dir, self.name, int(self.float_parameter("torch_threads", 0)), self.kernel_probe(),
            self.float_parameter("retain_memory_mb", -1), self.float_parameter("idle_release_s", IDLE_RELEASE_S),
            self.pb)
        info = self.script.info()
        if info["kernel_log"]:
            server_log(self.pb, info["kernel_log"])
        #: what the artifact's geometry() says ({} for an artifact without one)
        self.artifact_geometry: Dict[str, int] = info["geometry"]
        kernel = f", linear kernel {info['kernel']}" if info["kernel"] else ""
        where = (f" in torch worker {info['pid']}" if isinstance(self.script, RemoteScript)
                 else " in this stub")
        return info["description"] + kernel + where

    def after_warm_up(self) -> None:
        self.script.settle()

    def kernel_probe(self) -> Optional[Tuple[np.ndarray, ...]]:
        """Inputs of a typical forward to time the kernels on; None: the model has no kernel to choose."""
        return None

    def call_script(self, *arrays: np.ndarray) -> np.ndarray:
        """One forward of the artifact. A stub whose worker died cannot compute again: it exits, and the
        watchdog replaces it as any dead stub (the requests of this execution fail)."""
        try:
            return self.script(*arrays)
        except WorkerLost as exc:
            server_log(self.pb, f"{self.name}: {exc}; this stub exits so that it is replaced", warning=True)
            os._exit(1)

    def finalize(self) -> None:
        self.script.close()
        self.script = None


#: padded frames one forward of a batch of long items aims at (config parameter ``step_frames``): about
#: 0.6 s of one core alone, 2 s in a burst; longer batches run in windows (:mod:`.windows`)
STEP_FRAMES = 2048
#: the shortest window (``min_window_frames``): each costs its two contexts (31 frames either side for
#: the charactr backbone, 12 % of 512) on top, so a batch of many long items is not cut finer than this
MIN_WINDOW_FRAMES = 512


class VocoderModel(ScriptModel):
    """A vocoder (``vocos_mel``, ``vocos_encodec`` and their variants): features (C, T) [+ bandwidth_id]
    -> waveform; C, the frames-to-samples rule and the limits come from the config's geometry, which the
    artifact must share. A batch of long items runs in windows (:meth:`steps`)."""

    #: the bandwidth id of the warm-up and the kernel probe (the mel vocoders take none)
    probe_condition = 0

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        self.require_geometry()
        loaded = super().load_artifact(args, version_dir)
        artifact = self.artifact_geometry
        if not artifact:
            raise ValueError(f"{self.name}: model.pt has no geometry() (exported by an older build); rebuild the "
                             "repository with make repository")
        self.check_artifact(artifact, "model.pt")
        # an artifact exported before the windows existed does not say its context: it runs whole batches; so
        # does a GPU instance, whose forward of 60 s items takes milliseconds
        self.context_frames: Optional[int] = (int(artifact["context_frames"])
                                              if "context_frames" in artifact and not self.on_gpu else None)
        return f"{loaded}; {self.geometry.describe()}"

    def configure(self) -> None:
        self.step_frames = int(self.float_parameter("step_frames", STEP_FRAMES))
        self.min_window_frames = int(self.float_parameter("min_window_frames", MIN_WINDOW_FRAMES))

    def steps(self, items: List[FeaturesRow]) -> Steps:
        """The batch in windows of at least ``min_window_frames`` frames, about ``step_frames`` padded frames
        a forward, when its longest item needs more than one; else one forward."""
        frames = [it.features.shape[1] for it in items]
        window = max(self.min_window_frames, self.step_frames // len(items))
        if self.context_frames is None or max(frames) <= window + self.context_frames:
            return (yield from super().steps(items))

        def decode(members: List[int], first: int, end: int) -> np.ndarray:
            return self.forward([FeaturesRow(items[i].features[:, first : min(end, frames[i])],
                                             items[i].bandwidth_id) for i in members])

        waveforms = yield from decode_in_windows(frames, decode, window, self.context_frames,
                                                 self.geometry.hop_length, self.geometry.waveform_samples)
        return [None if w is None else {Tensor.WAVEFORM: w} for w in waveforms]

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([FeaturesRow(np.zeros((self.geometry.input_channels, 94), np.float32), self.probe_condition)])

    def kernel_probe(self) -> Tuple[np.ndarray, ...]:
        return vocoder_probe(self.require_geometry(), self.probe_condition)

    def forward(self, items: List[FeaturesRow]) -> np.ndarray:
        """One padded forward: (B, L) waveforms, item b's audio its first ``waveform_samples(T_b)`` samples."""
        features = [it.features for it in items]
        condition = np.array([it.bandwidth_id for it in items], dtype=np.int64)
        return self.call_script(pad_stack(features), lengths(features), condition)

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


class EncodecEncoderModel(ScriptModel):
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
        codebooks = np.array([it.bandwidth.codebooks for it in items], dtype=np.int64)
        codes = self.call_script(pad_stack(audio), samples, codebooks)
        return [
            {Tensor.CODES: codes[i, : it.bandwidth.codebooks, : self.geometry.frames(int(n))]}
            for i, (it, n) in enumerate(zip(items, samples))
        ]
