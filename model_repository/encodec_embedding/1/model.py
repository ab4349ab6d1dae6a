"""Triton entry point of `encodec_embedding`; the implementation is
vocos_triton.serving.embedding.EncodecEmbeddingModel."""
from vocos_triton.serving.embedding import EncodecEmbeddingModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
