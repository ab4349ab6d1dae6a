"""Base class of the models that run a TorchScript artifact (``model.pt``) with torch."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from .base import Outputs, RaggedBatchModel

ARTIFACT = "model.pt"


def set_quantized_engine() -> str:
    """Use oneDNN for int8 where it exists (fastest here: VNNI); the engine also packs the weights at load."""
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
    return torch.backends.quantized.engine


def load_torchscript(args: Dict[str, str], version_dir: str,
                     threads: int) -> Tuple[torch.jit.ScriptModule, torch.device, str]:
    """``<version>/model.pt`` on the instance's device (Triton's ``model_instance_kind``); ``threads`` > 0
    sets torch's intra-op threads (0: torch's default, one per core). Returns the module, its device and
    a description for the log."""
    if threads > 0:
        torch.set_num_threads(threads)
    if args.get("model_instance_kind") == "GPU":
        device = torch.device("cuda", int(args["model_instance_device_id"]))
    else:
        device = torch.device("cpu")
    set_quantized_engine()  # int8 artifacts (opt-in) repack their weights for this engine on load
    path = os.path.join(version_dir, ARTIFACT)
    module = torch.jit.load(path, map_location=device).eval()
    return module, device, f"{path} on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)"


class TorchScriptModel(RaggedBatchModel):
    """Loads ``<version>/model.pt`` on the instance's device; ``torch_threads`` (config) > 0 sets the
    intra-op threads (0: torch's default, one per core)."""

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        self.module, self.device, description = load_torchscript(
            args, version_dir, int(self.float_parameter("torch_threads", 0)))
        return description

    def run_batch(self, items: List[Any]) -> List[Outputs]:
        with torch.inference_mode():
            return self.infer(items)

    def finalize(self) -> None:
        self.module = None

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)
