"""The serving contract as code: constants, shape rules and input validation.

This module is the single source of the error messages that users see. The Triton models raise
:class:`InvalidInput` from these checks and turn it into an ``INVALID_ARG`` response; the client SDK
runs the same checks before sending, so a bad tensor fails with the same words locally and remotely.

It needs numpy only (no torch), because the client imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

SAMPLE_RATE = 24_000
MEL_BINS = 100
MEL_HOP = 256
FEATURE_DIM = 128
ENCODEC_HOP = 320
CODEBOOK_SIZE = 1024
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0)
#: EnCodec 24 kHz spends log2(1024) bits x 75 frames/s = 750 bps per codebook.
CODEBOOKS = (2, 4, 8, 16)
DEFAULT_MAX_SECONDS = 60.0


class Model:
    """Triton model names (``model_repository/<name>/``)."""

    MEL_FEATURES = "mel_features"
    VOCOS_MEL = "vocos_mel"
    ENCODEC_ENCODER = "encodec_encoder"
    ENCODEC_EMBEDDING = "encodec_embedding"
    VOCOS_ENCODEC = "vocos_encodec"
    RESYNTHESIZE_MEL = "resynthesize_mel"
    RESYNTHESIZE_ENCODEC = "resynthesize_encodec"
    DECODE_CODES = "decode_codes"
    VOCOS_MEL_STREAM = "vocos_mel_stream"
    DECODE_CODES_STREAM = "decode_codes_stream"


class Tensor:
    """Tensor names: ``audio`` is always a recording going in, ``waveform`` always synthesized audio."""

    AUDIO = "audio"
    MEL = "mel"
    CODES = "codes"
    BANDWIDTH = "bandwidth"
    FEATURES = "features"
    BANDWIDTH_ID = "bandwidth_id"
    WAVEFORM = "waveform"


class Access:
    """Who may do what (see docs/exposure.md): the keys tritonserver checks and the headers that carry them.

    The launcher restricts the protocol groups below with tritonserver's ``--grpc-restricted-protocol``
    and ``--http-restricted-api``; a gRPC client then sends ``triton-grpc-protocol-<key>: <value>``, an
    HTTP client ``<key>: <value>``. Everything not listed (health, metadata, model config, statistics)
    stays open.
    """

    ADMIN_KEY = "vocos-admin-key"
    API_KEY = "vocos-api-key"
    #: what changes the server: the repository API (load runs uploaded code), shared memory, trace, log
    ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
    #: what the optional API key guards
    API_PROTOCOLS = ("inference",)
    GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
    #: the client CLI's environment variable holding the API key
    API_KEY_ENV = "VOCOS_API_KEY"

    @classmethod
    def grpc_header(cls, key: str) -> str:
        return cls.GRPC_HEADER_PREFIX + key


#: A request parameter (INT64, ns since the epoch) with the time after which nobody waits for the answer:
#: the gRPC guard (vocos_triton.launcher.guard) turns a client's deadline into it, and the models skip a
#: request whose deadline has passed instead of computing it (ensembles pass it on to their steps).
DEADLINE_PARAMETER = "vocos_deadline_ns"

#: The entry points a client calls, by input kind (``audio_mel``: audio without a bandwidth).
ENTRY_MODELS = {
    "mel": Model.VOCOS_MEL,
    "audio_mel": Model.RESYNTHESIZE_MEL,
    "audio_encodec": Model.RESYNTHESIZE_ENCODEC,
    "codes": Model.DECODE_CODES,
}
#: The streaming models, by input kind.
STREAM_MODELS = {"mel": Model.VOCOS_MEL_STREAM, "codes": Model.DECODE_CODES_STREAM}

#: torch.stft's reflect padding of n_fft // 2 = 512 needs more samples than that (vocos 0.1.0).
MEL_MIN_SAMPLES = 513
ENCODEC_MIN_SAMPLES = 1
#: the centred ISTFT makes (T - 1) * 256 samples, so one frame makes none
MEL_MIN_FRAMES = 2
CODES_MIN_FRAMES = 1
FEATURES_MIN_FRAMES = 1
#: a stream's chunk may be a single frame; the sequence as a whole must reach the offline minimum
STREAM_CHUNK_MIN_FRAMES = 1


class InvalidInput(ValueError):
    """A request tensor breaks the contract; ``str()`` is ``"<tensor>: <what was expected, what came>"``."""

    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"{tensor}: {problem}")
        self.tensor = tensor
        self.problem = problem


def mel_frames(num_samples: int) -> int:
    """Frames of the centred 24 kHz log-mel of ``num_samples`` samples (vocos 0.1.0)."""
    return 1 + num_samples // MEL_HOP


def mel_waveform_samples(num_frames: int) -> int:
    """Samples the mel vocoder makes from ``num_frames`` frames (centred ISTFT)."""
    return (num_frames - 1) * MEL_HOP


def encodec_frames(num_samples: int) -> int:
    """EnCodec 24 kHz frames (75 Hz) for ``num_samples`` samples."""
    return math.ceil(num_samples / ENCODEC_HOP)


def encodec_waveform_samples(num_frames: int) -> int:
    """Samples the EnCodec-variant vocoder makes from ``num_frames`` frames ("same" ISTFT)."""
    return num_frames * ENCODEC_HOP


def _format_number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Bandwidth:
    """One EnCodec bandwidth, parsed once: ``kbps`` (1.5/3/6/12), ``index`` (the ``bandwidth_id`` 0..3)
    and ``codebooks`` (K = 2/4/8/16)."""

    kbps: float
    index: int
    codebooks: int

    @classmethod
    def parse(cls, value: object, tensor: str = Tensor.BANDWIDTH) -> Bandwidth:
        """A kbps value: a number, or a tensor of shape (1,); anything else is :class:`InvalidInput`."""
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
        if flat.size != 1:
            raise InvalidInput(tensor, f"expected one value in kbps, got {flat.size} values")
        kbps = float(flat[0])
        if kbps not in BANDWIDTHS:
            allowed = ", ".join(_format_number(b) for b in BANDWIDTHS)
            raise InvalidInput(tensor, f"expected one of {allowed} kbps, got {_format_number(kbps)}")
        return cls.from_index(BANDWIDTHS.index(kbps))

    @classmethod
    def from_index(cls, index: int) -> Bandwidth:
        return cls(BANDWIDTHS[index], index, CODEBOOKS[index])

    @classmethod
    def for_codebooks(cls, num_codebooks: int, tensor: str = Tensor.CODES) -> Bandwidth:
        """The bandwidth whose codes have ``num_codebooks`` rows, or :class:`InvalidInput`."""
        if num_codebooks not in CODEBOOKS:
            raise InvalidInput(tensor, f"expected 2, 4, 8 or 16 codebooks (1.5/3/6/12 kbps), got {num_codebooks}")
        return cls.from_index(CODEBOOKS.index(num_codebooks))


@dataclass(frozen=True)
class Limits:
    """Per-item length limits derived from ``max_seconds`` (the models' ``max_seconds`` parameter)."""

    max_seconds: float = DEFAULT_MAX_SECONDS

    @property
    def max_samples(self) -> int:
        return int(round(self.max_seconds * SAMPLE_RATE))

    @property
    def max_mel_frames(self) -> int:
        return mel_frames(self.max_samples)

    @property
    def max_code_frames(self) -> int:
        return encodec_frames(self.max_samples)


def check_dtype(tensor: str, array: np.ndarray, expected: np.dtype) -> None:
    if array.dtype != expected:
        raise InvalidInput(tensor, f"expected dtype {np.dtype(expected).name}, got {array.dtype.name}")


def check_rank(tensor: str, array: np.ndarray, rank: int, layout: str) -> None:
    if array.ndim != rank:
        raise InvalidInput(tensor, f"expected {rank} dimension(s) {layout}, got shape {tuple(array.shape)}")


def check_finite(tensor: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        bad = array[where]
        kind = "NaN" if np.isnan(bad) else "Inf"
        raise InvalidInput(tensor, f"expected finite values, got {kind} at index {list(where)}")


def check_length(tensor: str, length: int, minimum: int, maximum: int, unit: str, per_second: float) -> None:
    """Reject ``length`` outside ``[minimum, maximum]``; messages give seconds too, never truncate."""
    if length == 0:
        raise InvalidInput(tensor, f"expected at least {minimum} {unit}, got an empty {tensor}")
    if length < minimum:
        raise InvalidInput(tensor, f"expected at least {minimum} {unit}, got {length}")
    if length > maximum:
        raise InvalidInput(
            tensor,
            f"expected at most {maximum} {unit} ({maximum / per_second:g} s), got {length} "
            f"({length / per_second:g} s); split the input, it is never truncated",
        )


def validate_audio(audio: np.ndarray, min_samples: int, max_samples: int, tensor: str = Tensor.AUDIO) -> None:
    """One item of 24 kHz mono audio, shape (L,), float32, finite."""
    check_dtype(tensor, audio, np.float32)
    check_rank(tensor, audio, 1, "(samples,)")
    check_length(tensor, audio.shape[0], min_samples, max_samples, "samples", SAMPLE_RATE)
    check_finite(tensor, audio)


def _validate_frames(tensor: str, array: np.ndarray, channels: int, what: str, min_frames: int,
                     max_frames: int, frames_per_second: float) -> None:
    check_dtype(tensor, array, np.float32)
    check_rank(tensor, array, 2, f"({what}, frames)")
    if array.shape[0] != channels:
        raise InvalidInput(tensor, f"expected {channels} {what}, got {array.shape[0]}")
    check_length(tensor, array.shape[1], min_frames, max_frames, "frames", frames_per_second)
    check_finite(tensor, array)


def validate_mel(mel: np.ndarray, min_frames: int, max_frames: int, tensor: str = Tensor.MEL) -> None:
    """One item of log-mel features, shape (100, T), float32, finite."""
    _validate_frames(tensor, mel, MEL_BINS, "mel bins", min_frames, max_frames, SAMPLE_RATE / MEL_HOP)


def validate_features(features: np.ndarray, min_frames: int, max_frames: int, tensor: str = Tensor.FEATURES) -> None:
    """One item of EnCodec embedding features, shape (128, T), float32, finite."""
    _validate_frames(tensor, features, FEATURE_DIM, "feature channels", min_frames, max_frames,
                     SAMPLE_RATE / ENCODEC_HOP)


def validate_codes(codes: np.ndarray, bandwidth: Optional[Bandwidth], min_frames: int, max_frames: int,
                   tensor: str = Tensor.CODES) -> Bandwidth:
    """One item of EnCodec codes, shape (K, T), integer, in [0, 1024); returns its bandwidth.

    ``bandwidth=None`` infers it from K; otherwise K must be the bandwidth's codebook count.
    """
    if not np.issubdtype(codes.dtype, np.integer):
        raise InvalidInput(tensor, f"expected integer codes (int64), got dtype {codes.dtype.name}")
    check_rank(tensor, codes, 2, "(codebooks, frames)")
    num_codebooks, num_frames = codes.shape
    implied = Bandwidth.for_codebooks(num_codebooks, tensor)
    if bandwidth is not None and bandwidth.codebooks != num_codebooks:
        raise InvalidInput(
            tensor,
            f"{num_codebooks} codebooks do not match bandwidth {_format_number(bandwidth.kbps)} kbps, "
            f"which expects {bandwidth.codebooks}",
        )
    check_length(tensor, num_frames, min_frames, max_frames, "frames", SAMPLE_RATE / ENCODEC_HOP)
    check_code_values(codes, tensor)
    return implied


def check_code_values(codes: np.ndarray, tensor: str = Tensor.CODES) -> None:
    out_of_range = (codes < 0) | (codes >= CODEBOOK_SIZE)
    if out_of_range.any():
        where = tuple(int(i) for i in np.argwhere(out_of_range)[0])
        raise InvalidInput(
            tensor, f"expected values in [0, {CODEBOOK_SIZE}), got {int(codes[where])} at index {list(where)}"
        )


def check_sequence_total(tensor: str, total: int, max_frames: int, max_seconds: float) -> None:
    """A stream's frames so far, this chunk included: the chunk that takes it past the limit is refused."""
    if total > max_frames:
        raise InvalidInput(tensor, f"expected at most {max_frames} frames ({max_seconds:g} s) in a sequence, "
                                   f"this chunk brings it to {total}; end the stream and start another, "
                                   "nothing is truncated")


def check_sequence_end(tensor: str, total: int, min_frames: int) -> None:
    """A stream's frames at its end must reach the offline model's minimum."""
    if total < min_frames:
        raise InvalidInput(tensor, f"expected at least {min_frames} frames in a sequence, it ended with {total}")


def validate_bandwidth_id(value: np.ndarray, tensor: str = Tensor.BANDWIDTH_ID) -> int:
    """A bandwidth id in 0..3 (the index into :data:`BANDWIDTHS`)."""
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise InvalidInput(tensor, f"expected one value, got {flat.size}")
    index = int(flat[0])
    if not 0 <= index < len(BANDWIDTHS):
        raise InvalidInput(tensor, f"expected an id in 0..{len(BANDWIDTHS) - 1}, got {index}")
    return index
