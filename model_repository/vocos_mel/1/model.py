"""Triton entry point of `vocos_mel`; the implementation is vocos_triton.serving.models.VocosMelModel."""
from vocos_triton.serving.models import VocosMelModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
