"""The serving contract as code: constants, shape rules and input validation.

This module is the single source of the error messages that users see. The Triton models raise
:class:`InvalidInput` from these checks and turn it into an ``INVALID_ARG`` response; the client SDK
runs the same checks before sending, so a bad tensor fails with the same words locally and remotely.

It needs numpy only (no torch), because the client imports it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

#: EnCodec 24 kHz's bandwidths (kbps) and the codebooks each uses: log2(1024) bits x 75 frames/s = 750 bps
#: per codebook. Fixed by EnCodec, not by a Vocos checkpoint (which may serve them all, see checkpoints.py).
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0)
CODEBOOKS = (2, 4, 8, 16)
CODEBOOK_SIZE = 1024
DEFAULT_MAX_SECONDS = 60.0

MEL, ENCODEC = "mel", "encodec"  # the two kinds of Vocos: features in are log-mel, or EnCodec embeddings
CENTER, SAME = "center", "same"  # the two paddings of vocos' STFT / ISTFT
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
#: a request parameter (int64): the gRPC guard's number for the call, which the models note while they hold
#: it, so that the calls of a stub that dies can be sent again at once (vocos_triton.serving.holding)
CALL_PARAMETER = "vocos_call"

#: The entry points a client calls, by input kind (``audio_mel``: audio without a bandwidth).
ENTRY_MODELS = {
    "mel": Model.VOCOS_MEL,
    "audio_mel": Model.RESYNTHESIZE_MEL,
    "audio_encodec": Model.RESYNTHESIZE_ENCODEC,
    "codes": Model.DECODE_CODES,
}
#: The streaming models, by input kind.
STREAM_MODELS = {"mel": Model.VOCOS_MEL_STREAM, "codes": Model.DECODE_CODES_STREAM}

#: a stream's chunk may be a single frame; the sequence as a whole must reach the offline minimum
STREAM_CHUNK_MIN_FRAMES = 1


class InvalidInput(ValueError):
    """A request tensor breaks the contract; ``str()`` is ``"<tensor>: <what was expected, what came>"``."""

    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"{tensor}: {problem}")
        self.tensor = tensor
        self.problem = problem


# -- variants ----------------------------------------------------------------------------------------
#: The variant whose models keep the contract's names (``vocos_mel``, ``decode_codes``, ...).
DEFAULT_VARIANT = "default"
#: A variant NAME adds models named ``<model>__<NAME>`` (``vocos_mel__matcha22k``): lower-case letters and
#: digits, words joined by single ``-`` or ``_`` (so the ``__`` that joins model and variant stays unique).
VARIANT_SEPARATOR = "__"
VARIANT_NAME = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")
VARIANT_NAME_MAX = 40
#: the models a variant adds, by the kind of its checkpoint (the EnCodec encoder is shared: it is EnCodec's)
VARIANT_MODELS = {
    "mel": (Model.MEL_FEATURES, Model.VOCOS_MEL, Model.VOCOS_MEL_STREAM, Model.RESYNTHESIZE_MEL),
    "encodec": (Model.ENCODEC_EMBEDDING, Model.VOCOS_ENCODEC, Model.DECODE_CODES_STREAM, Model.DECODE_CODES,
                Model.RESYNTHESIZE_ENCODEC),
}
#: each kind's vocoder: the model whose config.pbtxt a client reads a variant's geometry from
VOCODERS = {"mel": Model.VOCOS_MEL, "encodec": Model.VOCOS_ENCODEC}


def check_variant_name(name: str) -> str:
    """``name`` if it may name a variant, else ValueError saying why."""
    if name == DEFAULT_VARIANT:
        return name
    if not VARIANT_NAME.match(name or "") or len(name) > VARIANT_NAME_MAX:
        raise ValueError(f"variant name {name!r}: expected lower-case letters and digits, words joined by single "
                         f"'-' or '_', at most {VARIANT_NAME_MAX} characters (e.g. matcha-22k)")
    return name


def variant_model(model: str, variant: Optional[str] = None) -> str:
    """The Triton name of ``model`` for ``variant``: the contract's name for the default variant (None or
    :data:`DEFAULT_VARIANT`), ``<model>__<variant>`` for any other."""
    if variant is None or variant == DEFAULT_VARIANT:
        return model
    return f"{model}{VARIANT_SEPARATOR}{check_variant_name(variant)}"


def split_model_name(name: str) -> Tuple[str, str]:
    """``(model, variant)`` of a Triton model name (inverse of :func:`variant_model`)."""
    model, _, variant = name.partition(VARIANT_SEPARATOR)
    return model, variant or DEFAULT_VARIANT


# -- geometry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """A Vocos model's geometry: what turns frames into samples and back, and what a valid input is.

    Read from the checkpoint's config when the repository is built, published in each model's
    config.pbtxt (:meth:`parameters`, and the dims), read back by the stubs, the launcher and the client
    (:meth:`from_parameters`). ``kind`` is ``mel`` (log-mel in, ``input_channels`` mel bins, made from audio
    by vocos' ``MelSpectrogramFeatures`` with this n_fft / hop / padding) or ``encodec`` (EnCodec 24 kHz
    embeddings in, ``input_channels`` = 128, one frame per ``hop_length`` = 320 samples of audio).
    ``padding`` is the ISTFT's (and the mel front end's): ``center`` makes (T - 1) * hop samples from T
    frames, ``same`` makes T * hop.
    """

    kind: str
    sample_rate: int
    input_channels: int
    hop_length: int
    n_fft: int
    padding: str
    bandwidths: Tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (MEL, ENCODEC):
            raise ValueError(f"geometry kind: expected {MEL!r} or {ENCODEC!r}, got {self.kind!r}")
        if self.padding not in (CENTER, SAME):
            raise ValueError(f"geometry padding: expected {CENTER!r} or {SAME!r}, got {self.padding!r}")
        for name in ("sample_rate", "input_channels", "hop_length", "n_fft"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"geometry {name}: expected a positive number, got {getattr(self, name)!r}")

    # -- frames and samples
    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def feature_name(self) -> str:
        """What one row of the vocoder's input is called in messages."""
        return "mel bins" if self.kind == MEL else "feature channels"

    @property
    def feature_tensor(self) -> str:
        return Tensor.MEL if self.kind == MEL else Tensor.FEATURES

    @property
    def _same_pad(self) -> int:
        """vocos' ``same`` reflect padding of the mel front end, at each end."""
        return (self.n_fft - self.hop_length) // 2

    def frames(self, num_samples: int) -> int:
        """Frames the front end makes from ``num_samples`` samples: vocos' log-mel (centred: 1 + L // hop;
        ``same``: reflect-padded by (n_fft - hop) // 2 at each end, no centring), or EnCodec's ceil(L / hop)."""
        if self.kind == ENCODEC:
            return math.ceil(num_samples / self.hop_length)
        if self.padding == CENTER:
            return 1 + num_samples // self.hop_length
        return max(0, (num_samples + 2 * self._same_pad - self.n_fft) // self.hop_length + 1)

    def waveform_samples(self, num_frames: int) -> int:
        """Samples the vocoder makes from ``num_frames`` frames."""
        return (num_frames - 1) * self.hop_length if self.padding == CENTER else num_frames * self.hop_length

    @property
    def min_frames(self) -> int:
        """The fewest frames the vocoder takes: the centred ISTFT makes no sample from one frame."""
        return 2 if self.padding == CENTER else 1

    @property
    def min_samples(self) -> int:
        """The shortest audio the front end takes: the mel's reflect padding needs more samples than it
        pads (n_fft // 2 centred, (n_fft - hop) // 2 with ``same``), and the result must reach
        :attr:`min_frames`; EnCodec takes any non-empty audio."""
        if self.kind == ENCODEC:
            return 1
        pad = self.n_fft // 2 if self.padding == CENTER else self._same_pad
        samples = pad + 1
        while self.frames(samples) < self.min_frames:
            samples += 1
        return samples

    def max_samples(self, max_seconds: float) -> int:
        return int(round(max_seconds * self.sample_rate))

    def max_frames(self, max_seconds: float) -> int:
        """The most frames of an item: those of the longest audio allowed."""
        return self.frames(self.max_samples(max_seconds))

    # -- validation (the same words locally and in the server)
    def validate_audio(self, audio: np.ndarray, max_seconds: float, tensor: str = Tensor.AUDIO) -> None:
        """One item of mono audio at :attr:`sample_rate`, shape (L,), float32, finite."""
        check_dtype(tensor, audio, np.float32)
        check_rank(tensor, audio, 1, "(samples,)")
        check_length(tensor, audio.shape[0], self.min_samples, self.max_samples(max_seconds), "samples",
                     self.sample_rate)
        check_finite(tensor, audio)

    def validate_features(self, array: np.ndarray, min_frames: int, max_frames: int,
                          tensor: Optional[str] = None) -> None:
        """One item of vocoder input (log-mel or EnCodec features), shape (input_channels, T), float32, finite."""
        tensor = tensor or self.feature_tensor
        what = self.feature_name
        check_dtype(tensor, array, np.float32)
        check_rank(tensor, array, 2, f"({what}, frames)")
        if array.shape[0] != self.input_channels:
            raise InvalidInput(tensor, f"expected {self.input_channels} {what}, got {array.shape[0]}")
        check_length(tensor, array.shape[1], min_frames, max_frames, "frames", self.frames_per_second)
        check_finite(tensor, array)

    def validate_codes(self, codes: np.ndarray, bandwidth: Optional[Bandwidth], min_frames: int, max_frames: int,
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
        check_length(tensor, num_frames, min_frames, max_frames, "frames", self.frames_per_second)
        check_code_values(codes, tensor)
        return implied

    # -- publication in config.pbtxt
    def dims_problem(self, declared: Mapping[str, Sequence[int]]) -> Optional[str]:
        """What is wrong with a config's tensor dims (name -> per-item dims) for this geometry: the vocoder
        input's first dim must be :attr:`input_channels`; None when they agree."""
        dims = list(declared.get(self.feature_tensor, ()))
        if dims and dims[0] != self.input_channels:
            return (f"{self.feature_tensor} dims {dims} disagree with the parameter "
                    f"{GeometryParameter.INPUT_CHANNELS!r} ({self.input_channels} {self.feature_name})")
        return None

    def parameters(self) -> Dict[str, str]:
        """The geometry as config.pbtxt ``parameters`` (string values), :meth:`from_parameters`' input."""
        published = {GeometryParameter.KIND: self.kind, GeometryParameter.SAMPLE_RATE: str(self.sample_rate),
                     GeometryParameter.INPUT_CHANNELS: str(self.input_channels),
                     GeometryParameter.HOP_LENGTH: str(self.hop_length), GeometryParameter.N_FFT: str(self.n_fft),
                     GeometryParameter.PADDING: self.padding}
        if self.bandwidths:
            published[GeometryParameter.BANDWIDTHS] = ",".join(_format_number(b) for b in self.bandwidths)
        return published

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], where: str = "config.pbtxt") -> Geometry:
        """The geometry a model publishes; ValueError naming ``where`` and the key when one is missing or bad."""
        def get(key: str) -> str:
            value = str(parameters.get(key, "")).strip()
            if not value:
                raise ValueError(f"{where}: no parameter {key!r} (the model's geometry; rebuild the repository "
                                 "with make repository)")
            return value

        def number(key: str) -> int:
            text = get(key)
            if not text.isdigit():
                raise ValueError(f"{where}: parameter {key!r} is {text!r}, expected a positive whole number")
            return int(text)

        kind, padding = get(GeometryParameter.KIND), get(GeometryParameter.PADDING)
        rate, channels = number(GeometryParameter.SAMPLE_RATE), number(GeometryParameter.INPUT_CHANNELS)
        hop, n_fft = number(GeometryParameter.HOP_LENGTH), number(GeometryParameter.N_FFT)
        try:
            bandwidths = tuple(float(b) for b in str(parameters.get(GeometryParameter.BANDWIDTHS, "")).split(",")
                               if b.strip())
            return cls(kind, rate, channels, hop, n_fft, padding, bandwidths)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def describe(self) -> str:
        """``24000 Hz, 100 mel bins, hop 256, n_fft 1024, center``: for logs and messages."""
        return (f"{self.sample_rate} Hz, {self.input_channels} {self.feature_name}, hop {self.hop_length}, "
                f"n_fft {self.n_fft}, {self.padding}")


class GeometryParameter:
    """The config.pbtxt ``parameters`` keys a model publishes its :class:`Geometry` under."""

    KIND = "input_kind"
    SAMPLE_RATE = "sample_rate"
    INPUT_CHANNELS = "input_channels"
    HOP_LENGTH = "hop_length"
    N_FFT = "n_fft"
    PADDING = "padding"
    BANDWIDTHS = "bandwidths"
    #: the variant the model belongs to (:data:`DEFAULT_VARIANT` for the contract's names)
    VARIANT = "variant"
    GEOMETRY = (KIND, SAMPLE_RATE, INPUT_CHANNELS, HOP_LENGTH, N_FFT, PADDING, BANDWIDTHS)


#: The geometries of the charactr checkpoints: the default variant's, unless its checkpoints say otherwise.
MEL_24KHZ = Geometry(MEL, 24_000, 100, 256, 1024, CENTER)
ENCODEC_24KHZ = Geometry(ENCODEC, 24_000, 128, 320, 1280, SAME, BANDWIDTHS)
#: what EnCodec 24 kHz itself fixes for every EnCodec-conditioned Vocos (its encoder makes the frames)
ENCODEC_SAMPLE_RATE, ENCODEC_HOP, ENCODEC_DIM = 24_000, 320, 128
DEFAULT_GEOMETRY = {MEL: MEL_24KHZ, ENCODEC: ENCODEC_24KHZ}


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
    """Per-item length limit: ``max_seconds`` of audio (the models' ``max_seconds`` parameter), in samples
    and frames of a :class:`Geometry`."""

    max_seconds: float = DEFAULT_MAX_SECONDS

    def max_samples(self, geometry: Geometry) -> int:
        return geometry.max_samples(self.max_seconds)

    def max_frames(self, geometry: Geometry) -> int:
        return geometry.max_frames(self.max_seconds)


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
