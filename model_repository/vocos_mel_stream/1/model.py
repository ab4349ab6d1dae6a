"""Triton entry point of `vocos_mel_stream`; the implementation is
vocos_triton.serving.streaming.VocosMelStreamModel."""
from vocos_triton.serving.priority import lower_compute_priority

lower_compute_priority()  # first: the imports below are the stub's own start (serving/priority.py)
from vocos_triton.serving.streaming import VocosMelStreamModel as TritonPythonModel  # noqa: E402

__all__ = ["TritonPythonModel"]
