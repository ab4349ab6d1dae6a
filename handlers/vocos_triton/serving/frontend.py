"""``mel_features``: audio (L,) -> log-mel (bins, frames), in numpy on CPU instances; the geometry
(sample rate, bins, n_fft, hop, padding) is the config's, which the artifact must share.

Importing this module imports no torch. A CPU instance runs :class:`.melbank.MelBank` (numpy + MKL's
FFT, ``melbank.npz``), so the two ``mel_features`` stubs of the CPU profile carry no torch (measured:
27 MB of PSS each after loading, against 160 MB with torch). A GPU instance (``configs/gpu.pbtxt``,
KIND_GPU) runs the TorchScript ``model.pt`` on its GPU and imports torch only then: a KIND_GPU
instance that computed on the CPU would be config and code disagreeing. (Numpy there would spare that
stub its torch import and CUDA context; the way to get that is a KIND_CPU ``mel_features`` in the GPU
profile, a choice for the profile renderer, :mod:`vocos_triton.launcher.profiles`.) A CPU instance
also falls back to ``model.pt``, and says so in the log, where the repository has no ``melbank.npz``
(built without MKL) or the runtime has no MKL: the numbers are then the TorchScript module's, never
those of numpy's own FFT (see :mod:`.dfti`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np

from ..contract import Tensor
from .base import Outputs, RaggedBatchModel, Row, server_log
from .dfti import FftUnavailable
from .melbank import MELBANK_FILE, MelBank

#: a ragged batch of (L,) float32 audio -> each item's (bins, frames) log-mel
FrontEnd = Callable[[Sequence[np.ndarray]], List[np.ndarray]]


@dataclass(frozen=True)
class AudioRow:
    audio: np.ndarray  # (L,) float32


class MelFeaturesModel(RaggedBatchModel):
    """audio (L,) at the geometry's rate -> mel (bins, frames)."""

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        geometry = self.require_geometry()
        if args.get("model_instance_kind") != "GPU":
            path = os.path.join(version_dir, MELBANK_FILE)
            try:
                bank = MelBank.load(path)
            except (FileNotFoundError, FftUnavailable) as exc:
                server_log(self.pb, f"{self.name}: serving model.pt with torch instead of the numpy front end: "
                                    f"{exc}", warning=True)
            else:
                self.check_artifact(bank.geometry(), MELBANK_FILE)
                self.front_end: FrontEnd = bank
                return f"{path} (numpy, MKL FFT); {geometry.describe()}"
        from .torchscript import TorchScriptMelFeatures  # torch, imported only on this path

        front_end = TorchScriptMelFeatures(args, version_dir, int(self.float_parameter("torch_threads", 0)), geometry)
        self.check_artifact(front_end.module.geometry(), "model.pt")
        self.front_end = front_end
        return f"{front_end.description}; {geometry.describe()}"

    def warm_up(self) -> None:
        for _ in range(2):
            self.infer([AudioRow(np.zeros(self.geometry.sample_rate, np.float32))])

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        audio = row[Tensor.AUDIO]
        self.geometry.validate_audio(audio, self.limits.max_seconds)
        return self.geometry.frames(audio.shape[0]), AudioRow(audio)

    def infer(self, items: List[AudioRow]) -> List[Outputs]:
        return [{Tensor.MEL: mel} for mel in self.front_end([it.audio for it in items])]

    def finalize(self) -> None:
        self.front_end = None
