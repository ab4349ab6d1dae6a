"""Base class of the models that run a TorchScript artifact (``model.pt``) with torch."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Outputs, RaggedBatchModel, server_log
from .kernels import KernelChoice, choose_linear_kernel, measure_once, switchable

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
        # fp32 artifacts are exact to the reference (1e-4); TF32 convolutions (cuDNN's default) are
        # not (~1e-3). The fast GPU path is the opt-in fp16 backbone (make repository PRECISION=fp16).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        device = torch.device("cpu")
    set_quantized_engine()  # int8 artifacts (opt-in) repack their weights for this engine on load
    path = os.path.join(version_dir, ARTIFACT)
    module = torch.jit.load(path, map_location=device).eval()
    return module, device, f"{path} on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)"


def choose_and_log_kernel(module: torch.jit.ScriptModule, device: torch.device,
                          probe: Optional[Sequence[Any]], name: str, pb: Any) -> Optional[KernelChoice]:
    """Choose ``module``'s Linear kernel by timing it on ``probe`` (its forward's arguments; tensors go to
    ``device``) and write the choice into tritonserver's log; None when there is nothing to choose."""
    if probe is None or not switchable(module) or device.type != "cpu":
        return None
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in probe]
    # the instances of a model are stubs of the same tritonserver (their parent): one measures for all
    choice = measure_once(f"{os.getppid()}-{name}", lambda: choose_linear_kernel(module, args, model=name))
    module.set_linear_kernel(choice.kernel)
    server_log(pb, choice.log_line(name))
    return choice


class TorchScriptModel(RaggedBatchModel):
    """Loads ``<version>/model.pt`` on the instance's device; ``torch_threads`` (config) > 0 sets the
    intra-op threads (0: torch's default, one per core)."""

    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        self.module, self.device, description = load_torchscript(
            args, version_dir, int(self.float_parameter("torch_threads", 0)))
        self.kernel_choice = self.choose_kernel()
        kernel = f", linear kernel {self.kernel_choice.describe()}" if self.kernel_choice else ""
        return description + kernel

    def choose_kernel(self) -> Optional[KernelChoice]:
        """Time the vocoder's Linear kernels on this CPU and keep the faster (see :mod:`.kernels`)."""
        return choose_and_log_kernel(self.module, self.device, self.kernel_probe(), self.name, self.pb)

    def kernel_probe(self) -> Optional[Tuple[torch.Tensor, ...]]:
        """Inputs of a typical forward to time the kernels on; None: the model has no kernel to choose."""
        return None

    def run_batch(self, items: List[Any]) -> List[Outputs]:
        with torch.inference_mode():
            return self.infer(items)

    def finalize(self) -> None:
        self.module = None

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)
