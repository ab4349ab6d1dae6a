"""Triton entry point of `mel_features`; the implementation is vocos_triton.serving.models.MelFeaturesModel."""
from vocos_triton.serving.models import MelFeaturesModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
