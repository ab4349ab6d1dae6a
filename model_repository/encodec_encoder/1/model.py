"""Triton entry point of `encodec_encoder`; the implementation is vocos_triton.serving.models.EncodecEncoderModel."""
from vocos_triton.serving.priority import lower_compute_priority

lower_compute_priority()  # first: the imports below are the stub's own start (serving/priority.py)
from vocos_triton.serving.models import EncodecEncoderModel as TritonPythonModel  # noqa: E402

__all__ = ["TritonPythonModel"]
