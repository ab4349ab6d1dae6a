"""Triton entry point of `mel_features`; the implementation is vocos_triton.serving.frontend.MelFeaturesModel
(numpy, no torch, on CPU instances)."""
from vocos_triton.serving.frontend import MelFeaturesModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
