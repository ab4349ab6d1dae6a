"""What the reference packages (vocos 0.1.0, encodec 0.1.1) output for one item, as numpy."""
from __future__ import annotations

import numpy as np
import torch

from vocos_triton.contract import BANDWIDTHS, Bandwidth


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=array.dtype, copy=True))


def mel_features(reference, audio: np.ndarray) -> np.ndarray:
    """(L,) -> (100, 1 + L // 256): ``vocos.feature_extractors.MelSpectrogramFeatures``."""
    with torch.inference_mode():
        return reference.feature_extractor(_t(audio)[None])[0].numpy()


def mel_decode(reference, mel: np.ndarray) -> np.ndarray:
    """(100, T) -> ((T - 1) * 256,): ``Vocos.decode``."""
    return reference.decode(_t(mel)[None])[0].numpy()


def mel_resynthesize(reference, audio: np.ndarray) -> np.ndarray:
    """``Vocos.forward`` on the mel model."""
    return reference(_t(audio)[None])[0].numpy()


def encodec_codes(reference, audio: np.ndarray, bandwidth: float) -> np.ndarray:
    """(L,) -> (K, ceil(L / 320)) int64: the EnCodec encoder + RVQ that ``EncodecFeatures`` runs."""
    extractor = reference.feature_extractor
    extractor.encodec.set_target_bandwidth(bandwidth)
    with torch.inference_mode():
        return extractor.get_encodec_codes(_t(audio)[None])[:, 0].numpy()


def codes_to_features(reference, codes: np.ndarray) -> np.ndarray:
    """(K, T) -> (128, T): ``Vocos.codes_to_features``."""
    return reference.codes_to_features(_t(codes))[0].numpy()


def encodec_decode(reference, features: np.ndarray, bandwidth: float) -> np.ndarray:
    """(128, T) -> (T * 320,): ``Vocos.decode`` with the bandwidth's id."""
    bandwidth_id = torch.tensor([Bandwidth.parse(bandwidth).index])
    return reference.decode(_t(features)[None], bandwidth_id=bandwidth_id)[0].numpy()


def encodec_resynthesize(reference, audio: np.ndarray, bandwidth: float) -> np.ndarray:
    """``Vocos.forward(audio, bandwidth_id=...)`` on the EnCodec-variant model."""
    return reference(_t(audio)[None], bandwidth_id=torch.tensor([Bandwidth.parse(bandwidth).index]))[0].numpy()


def decode_codes(reference, codes: np.ndarray, bandwidth: float) -> np.ndarray:
    """The transformers doc's codes path: ``codes_to_features`` then ``decode``."""
    return encodec_decode(reference, codes_to_features(reference, codes), bandwidth)


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


__all__ = ["BANDWIDTHS", "mel_features", "mel_decode", "mel_resynthesize", "encodec_codes", "codes_to_features",
           "encodec_decode", "encodec_resynthesize", "decode_codes", "max_error"]
