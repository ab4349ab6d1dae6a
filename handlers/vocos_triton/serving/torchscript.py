"""TorchScript artifacts (``model.pt``) where torch is: a worker of the torch host, the streaming stubs,
a GPU instance, or a stub started without the host (:mod:`.scripts` decides where)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..contract import Geometry
from .base import pad_stack, server_log
from .kernels import KernelChoice, choose_linear_kernel, measure_once, switchable
from .scripts import kernel_measure_key

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


def choose_kernel(module: torch.jit.ScriptModule, device: torch.device, probe: Optional[Sequence[Any]], name: str,
                  measure_key: str) -> Optional[KernelChoice]:
    """Set ``module``'s Linear kernel, chosen by timing it on ``probe`` (its forward's arguments; tensors go
    to ``device``), once per ``measure_key`` (the other instances of the model share the choice); None
    when there is nothing to choose."""
    if probe is None or not switchable(module) or device.type != "cpu":
        return None
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in probe]
    choice = measure_once(measure_key, lambda: choose_linear_kernel(module, args, model=name))
    module.set_linear_kernel(choice.kernel)
    return choice


def choose_and_log_kernel(module: torch.jit.ScriptModule, device: torch.device,
                          probe: Optional[Sequence[Any]], name: str, pb: Any) -> Optional[KernelChoice]:
    """:func:`choose_kernel` in a stub (its parent is the tritonserver the instances share), the choice
    written into tritonserver's log."""
    choice = choose_kernel(module, device, probe, name, kernel_measure_key(name))
    if choice is not None:
        server_log(pb, choice.log_line(name))
    return choice


class LoadedScript:
    """A TorchScript artifact on its device, called with numpy arrays (its forward's arguments) and
    returning numpy; what :class:`~vocos_triton.serving.scripts.RemoteScript` runs in a worker."""

    def __init__(self, args: Dict[str, str], version_dir: str, threads: int, name: str, measure_key: str,
                 kernel_probe: Optional[Sequence[np.ndarray]] = None) -> None:
        self.module, self.device, self.description = load_torchscript(args, version_dir, threads)
        self.kernel_choice = choose_kernel(self.module, self.device, kernel_probe, name, measure_key)
        self.name = name

    def info(self) -> Dict[str, Any]:
        geometry = ({k: int(v) for k, v in self.module.geometry().items()} if hasattr(self.module, "geometry")
                    else {})
        choice = self.kernel_choice
        return {"description": self.description, "geometry": geometry, "pid": os.getpid(),
                "kernel": choice.describe() if choice else None,
                "kernel_log": choice.log_line(self.name) if choice else None}

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]
        with torch.inference_mode():
            return self.module(*tensors).cpu().numpy()

    def settle(self) -> None:
        """Nothing to do: in the stub's own process, the stub's heap policy covers the module."""

    def close(self) -> None:
        self.module = None


class TorchScriptMelFeatures:
    """``mel_features``' front end on a GPU instance (or a CPU one without MKL, see
    :mod:`vocos_triton.serving.frontend`): ``model.pt``, a TorchScript
    :class:`vocos_triton.modules.features.MelFeatures`, on the instance's device."""

    def __init__(self, args: Dict[str, str], version_dir: str, threads: int, geometry: Geometry) -> None:
        self.module, self.device, self.description = load_torchscript(args, version_dir, threads)
        self.geometry = geometry

    def __call__(self, audio: Sequence[np.ndarray]) -> List[np.ndarray]:
        samples = torch.tensor([a.shape[-1] for a in audio], dtype=torch.long)
        with torch.inference_mode():
            padded = torch.from_numpy(pad_stack(audio)).to(self.device)
            mel = self.module(padded, samples.to(self.device)).cpu().numpy()
        return [mel[i, :, : self.geometry.frames(int(n))] for i, n in enumerate(samples)]
