"""Base class of the models that run a TorchScript artifact (``model.pt``) with torch."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np
import torch

from .base import RaggedBatchModel

ARTIFACT = "model.pt"


def set_quantized_engine() -> str:
    """Use oneDNN for int8 where it exists (fastest here: VNNI); the engine also packs the weights at load."""
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
    return torch.backends.quantized.engine


class TorchScriptModel(RaggedBatchModel):
    """Loads ``<version>/model.pt`` on the instance's device; ``torch_threads`` (config) > 0 sets the
    intra-op threads (0: torch's default, one per core)."""

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        threads = int(self.float_parameter("torch_threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
        set_quantized_engine()  # int8 artifacts (opt-in) repack their weights for this engine on load
        path = os.path.join(version_dir, ARTIFACT)
        self.module = torch.jit.load(path, map_location=self.device).eval()
        return f"{path} on {self.device} (torch {torch.__version__}, {torch.get_num_threads()} threads)"

    def run_batch(self, items: List[Dict[str, Any]]) -> List[Dict[str, np.ndarray]]:
        with torch.inference_mode():
            return self.infer(items)

    def finalize(self) -> None:
        self.module = None

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)
