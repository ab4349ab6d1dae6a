"""Triton entry point of `decode_codes_stream`; the implementation is
vocos_triton.serving.streaming.DecodeCodesStreamModel."""
from vocos_triton.serving.streaming import DecodeCodesStreamModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
