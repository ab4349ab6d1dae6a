"""``encodec_embedding``: codes (K, T) + bandwidth -> features (128, T) + bandwidth_id, in numpy.

It imports no torch (see :mod:`vocos_triton.codebooks`): its stub is the smallest process of the server.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from .. import contract as c
from ..codebooks import TABLE_FILE, CodebookTable
from .base import RaggedBatchModel, Row


class EncodecEmbeddingModel(RaggedBatchModel):
    """codes (K, T), bandwidth (1,) -> features (128, T), bandwidth_id (1,)."""

    min_frames = 1

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        path = f"{version_dir}/{TABLE_FILE}"
        self.table = CodebookTable.load(path)
        return f"{path} ({self.table.codebooks} codebooks x {self.table.bins}, numpy)"

    def configure(self) -> None:
        self.max_frames = c.encodec_frames(c.max_samples(self.max_seconds))

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        codes = row["codes"]
        bandwidth = c.validate_codes(codes, c.scalar_bandwidth(row["bandwidth"]), self.min_frames, self.max_frames)
        return codes.shape[1], {"codes": codes, "bandwidth_id": c.bandwidth_id(bandwidth)}

    def infer(self, items: List[Dict[str, Any]]) -> List[Dict[str, np.ndarray]]:
        # item by item: a lookup has nothing to gain from padding, and K differs between items
        return [{"features": self.table.features(it["codes"]), "bandwidth_id": np.array([it["bandwidth_id"]], np.int64)}
                for it in items]

    def finalize(self) -> None:
        self.table = None
