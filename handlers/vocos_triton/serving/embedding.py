"""``encodec_embedding``: codes (K, T) + bandwidth -> features (128, T) + bandwidth_id, in numpy.

It imports no torch (see :mod:`vocos_triton.serving.codebooks`): its stub is the smallest process of the server.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from .. import contract as c
from ..contract import Tensor
from .base import Outputs, RaggedBatchModel, Row
from .codebooks import TABLE_FILE, CodebookTable


@dataclass(frozen=True)
class CodesRow:
    codes: np.ndarray  # (K, T) integers in [0, 1024)
    bandwidth: c.Bandwidth


class EncodecEmbeddingModel(RaggedBatchModel):
    """codes (K, T), bandwidth (1,) -> features (128, T), bandwidth_id (1,)."""

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        path = f"{version_dir}/{TABLE_FILE}"
        self.table = CodebookTable.load(path)
        return f"{path} ({self.table.codebooks} codebooks x {self.table.bins}, numpy)"

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        codes = row[Tensor.CODES]
        geometry = self.require_geometry()
        bandwidth = geometry.validate_codes(codes, c.Bandwidth.parse(row[Tensor.BANDWIDTH]), geometry.min_frames,
                                            self.limits.max_frames(geometry))
        return codes.shape[1], CodesRow(codes, bandwidth)

    def infer(self, items: List[CodesRow]) -> List[Outputs]:
        # item by item: a lookup has nothing to gain from padding, and K differs between items
        return [{Tensor.FEATURES: self.table.features(it.codes),
                 Tensor.BANDWIDTH_ID: np.array([it.bandwidth.index], np.int64)} for it in items]

    def finalize(self) -> None:
        self.table = None
