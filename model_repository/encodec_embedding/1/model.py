"""Triton entry point of `encodec_embedding`; the implementation is vocos_triton.serving.models.EncodecEmbeddingModel."""
from vocos_triton.serving.models import EncodecEmbeddingModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
