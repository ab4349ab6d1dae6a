"""EnCodec codes -> Vocos features in numpy: ``Vocos.codes_to_features`` without torch.

The embedding step is a table lookup and a sum over codebooks, a few microseconds of numpy for a
clip. Running it in numpy means the ``encodec_embedding`` stub never imports torch, which saves that
process most of its memory (a torch import is most of a stub's memory, see :mod:`vocos_triton.launcher.runtime`)
and part of a millisecond of every ``decode_codes`` request (docs/performance.md). The codebooks are
added in order 0, 1, ..., K-1 in float32, which is what ``torch.sum(dim=0)`` does for these sizes: the
features equal the reference bit for bit (the export checks this and tests it on real speech codes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

#: the artifact file of ``encodec_embedding/1/``: the (16 * 1024, 128) float32 codebook weights
TABLE_FILE = "codebooks.npy"


class CodebookTable:
    """features(codes (K, T) ints in [0, bins)) -> (128, T) float32: the sum of the K codebooks' embeddings.

    ``weight`` is ``feature_extractor.codebook_weights`` of the EnCodec Vocos: codebook k's rows are
    ``weight[k * bins : (k + 1) * bins]``.
    """

    def __init__(self, weight: np.ndarray, bins: int = 1024) -> None:
        if weight.ndim != 2 or weight.shape[0] % bins:
            raise ValueError(f"codebook weights: expected (codebooks * {bins}, dim), got {weight.shape}")
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bins = bins

    @property
    def codebooks(self) -> int:
        return self.weight.shape[0] // self.bins

    def features(self, codes: np.ndarray) -> np.ndarray:
        """(K, T) codes -> (128, T) features; K may be anything up to :attr:`codebooks`."""
        rows = codes + (np.arange(codes.shape[0], dtype=np.int64) * self.bins)[:, None]
        summed = self.weight[rows[0]]  # a fresh (T, dim) array
        for k in range(1, rows.shape[0]):
            summed += self.weight[rows[k]]
        return np.ascontiguousarray(summed.T)

    def save(self, path: Union[str, Path]) -> None:
        np.save(path, self.weight)

    @classmethod
    def load(cls, path: Union[str, Path], bins: int = 1024) -> CodebookTable:
        return cls(np.load(path, allow_pickle=False), bins)
