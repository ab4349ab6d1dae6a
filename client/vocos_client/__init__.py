"""Client SDK for Vocos on Triton: speech from mel features, audio or EnCodec codes, over gRPC.

>>> from vocos_client import VocosClient
>>> with VocosClient("localhost:8001") as vc:
...     y = vc.synthesize(mel=mel)                                     # (100, T) log-mel
...     y = vc.synthesize(audio=x, sample_rate=16000)                  # mel resynthesis
...     y = vc.synthesize(audio=x, sample_rate=16000, bandwidth=6.0)   # EnCodec resynthesis
...     y = vc.synthesize(codes=codes)                                 # (8, T) codes -> 6 kbps
...     ys = vc.synthesize_batch(mels)                                 # concurrent -> server-side batches
...     for piece in vc.stream(mel=chunks):                            # streaming: an array, or chunks as
...         play(piece)                                                # they are made; exact pieces, in order
...     vc.variants()                                                  # the checkpoints the server holds
...     y = vc.synthesize(mel=mel80, variant="matcha-22k")             # a named variant: its own geometry

Every result is float32 mono audio of shape (samples,) at the variant's sample rate:
``vc.sample_rate_of(variant, kind)`` as the server publishes it; ``vc.sample_rate`` (24000) is the default
variant's nominal rate (the charactr checkpoints). Needs numpy, tritonclient[grpc], soxr (resampling),
and for the CLI soundfile and tqdm; never torch.
"""
from __future__ import annotations

from vocos_triton.contract import Geometry

from ._aio import AsyncVocosClient
from ._client import VocosClient
from ._errors import (
    DeadlineExceededError,
    InvalidInputError,
    PermissionDeniedError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    VocosError,
)
from ._inputs import MODELS, SAMPLE_RATE, pcm_to_float32, resample
from ._variants import Variant

__version__ = "0.1.0"

__all__ = [
    "VocosClient",
    "AsyncVocosClient",
    "VocosError",
    "InvalidInputError",
    "ServerUnavailableError",
    "ServerBusyError",
    "PermissionDeniedError",
    "DeadlineExceededError",
    "ServerError",
    "Variant",
    "Geometry",
    "SAMPLE_RATE",
    "MODELS",
    "pcm_to_float32",
    "resample",
]
