"""Turn the arguments of ``synthesize`` into one Triton request: conversion, resampling, validation.

Pure numpy + soxr, no network: both clients (sync and asyncio) and the CLI share it, and everything
it rejects is rejected before a request is sent, with the server's own words
(:mod:`vocos_triton.contract`).

Which model serves which input (the transformers ``VocosProcessor`` semantics), for the default
variant (a named variant ``NAME`` has the same models named ``<model>__NAME``, and its own geometry: C mel
bins instead of 100, its sample rate instead of 24 kHz):

==================================  ========================  =====================================
call                                Triton model              request tensors (batch of 1)
==================================  ========================  =====================================
``mel=(100, T)``                    ``vocos_mel``             ``mel`` FP32 [1, 100, T]
``audio=(L,)``                      ``resynthesize_mel``      ``audio`` FP32 [1, L]
``audio=(L,), bandwidth=kbps``      ``resynthesize_encodec``  ``audio`` FP32 [1, L], ``bandwidth`` FP32 [1, 1]
``codes=(K, T)[, bandwidth=kbps]``  ``decode_codes``          ``codes`` INT64 [1, K, T], ``bandwidth`` FP32 [1, 1]
==================================  ========================  =====================================

The checks need the variant's :class:`~vocos_triton.contract.Geometry` (the client learns it from the
server, :mod:`vocos_client._variants`); without one, the default variant's
(:data:`~vocos_triton.contract.DEFAULT_GEOMETRY`, the charactr 24 kHz checkpoints) is used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from vocos_triton import contract as c
from vocos_triton.contract import DEFAULT_GEOMETRY, Geometry, Tensor

from ._errors import InvalidInputError
from ._variants import geometry_kind, normalize_variant

log = logging.getLogger("vocos_client")

ArrayLike = Union[np.ndarray, Sequence[Any]]

#: The default variant's nominal sample rate (the charactr checkpoints': 24000 Hz). A variant's own rate
#: is what the server publishes: :meth:`VocosClient.sample_rate_of <vocos_client.VocosClient.sample_rate_of>`.
SAMPLE_RATE = DEFAULT_GEOMETRY[c.MEL].sample_rate
#: Which Triton model serves which kind of input (``audio_mel``: audio without a bandwidth), for the
#: default variant; :func:`vocos_triton.contract.variant_model` names a variant's.
MODELS: Mapping[str, str] = c.ENTRY_MODELS
#: What ``geometry=`` of :func:`prepare` may be: one geometry (of the kind the call needs), or one per kind.
Geometries = Union[Geometry, Mapping[str, Geometry]]
OUTPUT = Tensor.WAVEFORM
Limits = c.Limits
DEFAULT_LIMITS = Limits()

# Integer PCM: full scale of each signed type, and the offset of unsigned 8-bit WAV data.
_PCM_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


@dataclass(frozen=True)
class Request:
    """One prepared request: the model and its tensors *without* the batch dimension."""

    model: str
    inputs: Dict[str, np.ndarray]

    def batched(self) -> Dict[str, np.ndarray]:
        """The tensors with the leading batch dimension of 1 that Triton expects."""
        return {name: np.ascontiguousarray(value[None]) for name, value in self.inputs.items()}


def _invalid(tensor: Optional[str], problem: str) -> InvalidInputError:
    return InvalidInputError(f"{tensor}: {problem}" if tensor else problem, tensor=tensor)


def _contract(exc: c.InvalidInput) -> InvalidInputError:
    return InvalidInputError(str(exc), tensor=exc.tensor)


def pcm_to_float32(audio: ArrayLike) -> np.ndarray:
    """Audio samples of any float or integer PCM dtype as float32 in [-1, 1], mono, shape (L,).

    * float16/32/64: taken as is (cast to float32); a Python list is taken as float samples.
    * int8, int16, int32: divided by full scale (128, 32768, 2**31); uint8: ``(x - 128) / 128``.
    * (L, 1) and (1, L) are squeezed to (L,). Several channels are an error (mix them down yourself,
      e.g. ``x.mean(axis=1)``): silently averaging could cancel out-of-phase channels.
    """
    if isinstance(audio, np.ndarray):
        array = audio
    else:
        try:
            array = np.asarray(audio, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise _invalid("audio", f"expected a sequence of numbers, got {type(audio).__name__} ({exc})") from None
    dtype = array.dtype
    if dtype.kind == "f":
        samples = array.astype(np.float32, copy=False)
    elif dtype in _PCM_SCALE:
        samples = (array.astype(np.float64) / _PCM_SCALE[dtype]).astype(np.float32)
    elif dtype == np.uint8:
        samples = ((array.astype(np.float64) - 128.0) / 128.0).astype(np.float32)
    else:
        raise _invalid("audio", f"expected float or int8/int16/int32/uint8 PCM samples, got dtype {dtype.name}")
    if samples.ndim == 2 and 1 in samples.shape:
        samples = samples.reshape(-1)
    if samples.ndim != 1:
        raise _invalid("audio", f"expected mono audio of shape (samples,), got shape {tuple(array.shape)}; "
                                "mix the channels down first, e.g. audio.mean(axis=1)")
    return samples


def resample(audio: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 (L,) at ``sample_rate`` -> float32 (L',) at ``target_rate`` (default 24 kHz) with soxr's "HQ"
    resampler."""
    if sample_rate == target_rate or audio.size == 0:
        return audio
    import soxr  # imported here so that mel/codes-only users never load it

    return np.ascontiguousarray(soxr.resample(audio, sample_rate, target_rate, quality="HQ"), dtype=np.float32)


def _rate_words(sample_rate: int) -> str:
    """``24 kHz``, ``22.05 kHz``, ``16 kHz``."""
    return f"{sample_rate / 1000:g} kHz"


def _sample_rate(sample_rate: Any) -> int:
    if sample_rate is None:
        raise _invalid("sample_rate", "required with audio=, the rate of the audio in Hz (e.g. 16000)")
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        raise _invalid("sample_rate", f"expected a rate in Hz, got {sample_rate!r}") from None
    if not rate.is_integer() or rate <= 0:
        raise _invalid("sample_rate", f"expected a positive whole number of Hz, got {sample_rate!r}")
    return int(rate)


def _bandwidth(bandwidth: Any, validate: bool) -> Optional[c.Bandwidth]:
    """``None`` for no bandwidth; the parsed one; unvalidated, a number the server will judge."""
    if bandwidth is None:
        return None
    try:
        value = float(bandwidth)
    except (TypeError, ValueError):
        raise _invalid(Tensor.BANDWIDTH, f"expected kbps as a number, got {bandwidth!r}") from None
    if validate or value in c.BANDWIDTHS:
        return c.Bandwidth.parse(value)
    return c.Bandwidth(value, -1, -1)  # validate=False: sent as given, for the server to refuse


def check_served(bandwidth: Optional[c.Bandwidth], geometry: Geometry, tensor: str = Tensor.BANDWIDTH) -> None:
    """A bandwidth the variant's EnCodec vocoder does not serve (its geometry's ``bandwidths``; an
    empty tuple serves every one) is :class:`~vocos_triton.contract.InvalidInput`."""
    if bandwidth is None or bandwidth.index < 0 or not geometry.bandwidths or bandwidth.kbps in geometry.bandwidths:
        return
    allowed = ", ".join(f"{b:g}" for b in geometry.bandwidths)
    if tensor == Tensor.BANDWIDTH:
        raise c.InvalidInput(tensor, f"expected one of {allowed} kbps, got {bandwidth.kbps:g}")
    raise c.InvalidInput(tensor, f"{bandwidth.codebooks} codebooks are {bandwidth.kbps:g} kbps, which this model "
                                 f"does not serve; it serves {allowed} kbps")


def _bandwidth_tensor(bandwidth: c.Bandwidth) -> np.ndarray:
    return np.array([bandwidth.kbps], np.float32)


def _squeeze_batch(array: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Drop a singleton batch axis at one of ``axes`` from a 3-D array (HF/vocos layouts)."""
    if array.ndim == 3:
        for axis in axes:
            if array.shape[axis] == 1:
                return np.squeeze(array, axis=axis)
    return array


def _as_mel(mel: ArrayLike) -> np.ndarray:
    """(C, T) float32 (C mel bins); a float64 array or a list is cast, (1, C, T) is squeezed."""
    array = mel if isinstance(mel, np.ndarray) else np.asarray(mel, dtype=np.float32)
    if array.dtype.kind == "f":
        array = array.astype(np.float32, copy=False)
    return np.ascontiguousarray(_squeeze_batch(array, (0,)))


def _as_codes(codes: ArrayLike) -> np.ndarray:
    """(K, T) integer codes; (K, 1, T) (the vocos/EnCodec layout) and (1, K, T) are squeezed."""
    array = codes if isinstance(codes, np.ndarray) else np.asarray(codes)
    return _squeeze_batch(array, (1, 0))


def _prepare_mel(mel: ArrayLike, bandwidth: Any, limits: Limits, validate: bool, geometry: Geometry,
                 variant: str) -> Request:
    if bandwidth is not None:
        raise _invalid(Tensor.BANDWIDTH, "the mel vocoder has no bandwidth; use it with audio= or codes=")
    array = _as_mel(mel)
    if validate:
        geometry.validate_features(array, geometry.min_frames, limits.max_frames(geometry), Tensor.MEL)
    return Request(c.variant_model(MODELS["mel"], variant), {Tensor.MEL: array})


def _prepare_audio(audio: ArrayLike, sample_rate: Any, bandwidth: Any, limits: Limits, validate: bool,
                   geometry: Geometry, variant: str) -> Request:
    rate = _sample_rate(sample_rate)
    parsed = _bandwidth(bandwidth, validate)
    if validate:
        check_served(parsed, geometry)
    samples = resample(pcm_to_float32(audio), rate, geometry.sample_rate)
    if validate:
        geometry.validate_audio(samples, limits.max_seconds)
    if rate != geometry.sample_rate:
        log.debug("resampled audio from %d Hz to %d Hz: %d samples", rate, geometry.sample_rate, samples.shape[0])
    if parsed is None:
        return Request(c.variant_model(MODELS["audio_mel"], variant), {Tensor.AUDIO: samples})
    return Request(c.variant_model(MODELS["audio_encodec"], variant),
                   {Tensor.AUDIO: samples, Tensor.BANDWIDTH: _bandwidth_tensor(parsed)})


def prepare_codes(codes: ArrayLike, bandwidth: Any, limits: Limits, validate: bool,
                  model: str = MODELS["codes"], min_frames: Optional[int] = None,
                  geometry: Geometry = DEFAULT_GEOMETRY[c.ENCODEC]) -> Request:
    """(K, T) codes and their bandwidth (inferred from K when ``None``) as a request to ``model``;
    ``min_frames`` defaults to the geometry's."""
    array = _as_codes(codes)
    parsed = _bandwidth(bandwidth, validate)
    if validate:
        check_served(parsed, geometry)
        minimum = geometry.min_frames if min_frames is None else min_frames
        implied = geometry.validate_codes(array, parsed, minimum, limits.max_frames(geometry))
        if parsed is None:
            check_served(implied, geometry, Tensor.CODES)
        parsed = implied
    elif parsed is None:
        # Unvalidated: the server still needs a bandwidth tensor; a valid placeholder lets it judge K.
        k = array.shape[0] if array.ndim >= 1 else 0
        parsed = c.Bandwidth.for_codebooks(k) if k in c.CODEBOOKS else c.Bandwidth.from_index(len(c.BANDWIDTHS) - 1)
    if np.issubdtype(array.dtype, np.integer):
        # Validated values are in [0, 1024), so the cast cannot wrap; unvalidated ones go as they are.
        array = array.astype(np.int64, copy=False)
    return Request(model, {Tensor.CODES: np.ascontiguousarray(array), Tensor.BANDWIDTH: _bandwidth_tensor(parsed)})


def call_kind(*, mel: Any = None, audio: Any = None, codes: Any = None, bandwidth: Any = None) -> str:
    """The kind of vocoder (``"mel"`` or ``"encodec"``) a ``synthesize`` call needs, so the geometry to
    validate with; :class:`InvalidInputError` unless exactly one input is given."""
    return geometry_kind(input_kind(mel=mel, audio=audio, codes=codes), bandwidth)


def pick_geometry(geometry: Optional[Geometries], kind: str) -> Geometry:
    """The geometry of ``kind`` from what :func:`prepare` was given (``None``: the default variant's)."""
    if geometry is None:
        return DEFAULT_GEOMETRY[kind]
    if isinstance(geometry, Geometry):
        picked = geometry
    elif kind in geometry:
        picked = geometry[kind]
    else:
        raise ValueError(f"geometry: no {kind} geometry given (have {sorted(geometry)})")
    if picked.kind != kind:
        raise ValueError(f"geometry: this call needs a {kind} geometry, got a {picked.kind} one ({picked.describe()})")
    return picked


def prepare(
    *,
    mel: Optional[ArrayLike] = None,
    audio: Optional[ArrayLike] = None,
    sample_rate: Optional[int] = None,
    bandwidth: Optional[float] = None,
    codes: Optional[ArrayLike] = None,
    limits: Limits = DEFAULT_LIMITS,
    validate: bool = True,
    geometry: Optional[Geometries] = None,
    variant: Optional[str] = None,
) -> Request:
    """Check the call, convert the input and pick the model; raise :class:`InvalidInputError` early.

    ``geometry`` is the variant's: a :class:`~vocos_triton.contract.Geometry` of the kind the call needs
    (:func:`call_kind`: mel for ``mel=`` and ``audio=`` without a bandwidth, EnCodec otherwise), or a
    mapping of kind to geometry; ``None`` is the default variant's (the charactr 24 kHz checkpoints).
    It sets the checks (mel bins, frame limits, shortest audio) and the rate ``audio=`` is resampled to.
    ``variant`` names the models (:func:`vocos_triton.contract.variant_model`).

    ``validate=False`` skips the contract checks on the tensors (the server makes them anyway) but
    still converts dtypes, resamples and checks the call itself (one input kind, ``sample_rate``).
    """
    kind = input_kind(mel=mel, audio=audio, codes=codes)
    name = normalize_variant(variant)
    picked = pick_geometry(geometry, geometry_kind(kind, bandwidth))
    if sample_rate is not None and kind != "audio":
        raise _invalid("sample_rate", f"only applies to audio=, not {kind}= (mel and codes are "
                                      f"{_rate_words(picked.sample_rate)} by construction)")
    try:
        if kind == "mel":
            return _prepare_mel(mel, bandwidth, limits, validate, picked, name)
        if kind == "audio":
            return _prepare_audio(audio, sample_rate, bandwidth, limits, validate, picked, name)
        return prepare_codes(codes, bandwidth, limits, validate, c.variant_model(MODELS["codes"], name),
                             geometry=picked)
    except c.InvalidInput as exc:
        raise _contract(exc) from None


def input_kind(**given: Any) -> str:
    """The one keyword of ``given`` that is not ``None``, or :class:`InvalidInputError`."""
    names = [name for name, value in given.items() if value is not None]
    if len(names) != 1:
        got = " and ".join(f"{name}=" for name in names) if names else "none"
        options = ", ".join(f"{name}=" for name in given)
        raise _invalid(None, f"expected exactly one of {options.rsplit(', ', 1)[0]} or {list(given)[-1]}=, got {got}")
    return names[0]
