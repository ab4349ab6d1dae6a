"""Triton entry point of `encodec_encoder`; the implementation is vocos_triton.serving.models.EncodecEncoderModel."""
from vocos_triton.serving.models import EncodecEncoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
