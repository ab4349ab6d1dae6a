"""Triton entry point of `vocos_encodec`; the implementation is vocos_triton.serving.models.VocosEncodecModel."""
from vocos_triton.serving.models import VocosEncodecModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
