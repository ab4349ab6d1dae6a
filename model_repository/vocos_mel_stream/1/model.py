"""Triton entry point of `vocos_mel_stream`; the implementation is
vocos_triton.serving.streaming.VocosMelStreamModel."""
from vocos_triton.serving.streaming import VocosMelStreamModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
