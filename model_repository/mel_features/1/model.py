"""Triton entry point of `mel_features`; the implementation is vocos_triton.serving.frontend.MelFeaturesModel
(numpy, no torch, on CPU instances)."""
from vocos_triton.serving.priority import lower_compute_priority

lower_compute_priority()  # first: the imports below are the stub's own start (serving/priority.py)
from vocos_triton.serving.frontend import MelFeaturesModel as TritonPythonModel  # noqa: E402

__all__ = ["TritonPythonModel"]
