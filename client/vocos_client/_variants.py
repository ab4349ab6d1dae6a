"""Variants: which Vocos checkpoints a server holds, and the geometry each one publishes.

A server holds the *default* variant (a mel and an EnCodec vocoder under the contract's model names,
``vocos_mel``, ``decode_codes``, ...) and any number of named ones, each one checkpoint of kind ``mel`` or
``encodec`` whose models are named ``<model>__<NAME>`` (:func:`vocos_triton.contract.variant_model`).
Every model's ``config.pbtxt`` publishes its geometry as string ``parameters``
(:class:`~vocos_triton.contract.GeometryParameter`); a client reads it from the variant's vocoder
(:data:`~vocos_triton.contract.VOCODERS`) and its streaming lookahead from the streaming model.

Pure logic, no network: the clients (sync and asyncio) do the calls and hand the answers to these
functions, so that the parsing and grouping can be tested without a server.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from vocos_triton import contract as c
from vocos_triton.contract import DEFAULT_GEOMETRY, DEFAULT_VARIANT, VARIANT_MODELS, VOCODERS, Geometry, Model

from ._errors import InvalidInputError, ServerError, ServerUnavailableError, VocosError

log = logging.getLogger("vocos_client")

#: the config.pbtxt parameter of a streaming model with its lookahead (frames the server waits for
#: before a sample is final)
LOOKAHEAD_PARAMETER = "lookahead_frames"
#: each kind's streaming model, whose config carries :data:`LOOKAHEAD_PARAMETER`
STREAMERS = {c.MEL: Model.VOCOS_MEL_STREAM, c.ENCODEC: Model.DECODE_CODES_STREAM}
KINDS = (c.MEL, c.ENCODEC)

#: how tritonserver answers a model config request for a model it does not have
_UNKNOWN_MODEL = re.compile(r"unknown model|not found", re.I)
_NOT_FOUND = "StatusCode.NOT_FOUND"


@dataclass(frozen=True)
class Variant:
    """One variant of one kind, as the server reports it (:meth:`VocosClient.variants
    <vocos_client.VocosClient.variants>`).

    The default variant is listed twice, once per kind (``Variant("default", "mel", ...)`` and
    ``Variant("default", "encodec", ...)``); a named variant once, with the kind of its checkpoint.

    Attributes:
        name: the variant's name, what ``variant=`` takes (``"default"`` for the contract's models).
        kind: ``"mel"`` (log-mel in: ``synthesize(mel=...)``, ``audio=`` without a bandwidth) or
            ``"encodec"`` (``codes=``, ``audio=`` with a bandwidth).
        sample_rate: Hz of the audio it makes (and of the audio it resynthesizes).
        input_channels: mel bins (``mel``) or EnCodec feature channels (``encodec``: 128).
        hop_length: samples per frame.
        n_fft: the ISTFT's window length.
        padding: ``"center"`` (T frames make (T - 1) * hop samples) or ``"same"`` (T * hop).
        lookahead_frames: frames the streaming model waits for before a sample is final; ``None`` when
            the variant has no streaming model loaded (or the server does not say).
        bandwidths: EnCodec kbps the variant serves (``()`` for mel).
        models: the variant's Triton models that are loaded (the EnCodec encoder, shared by every
            variant, is not listed).
    """

    name: str
    kind: str
    sample_rate: int
    input_channels: int
    hop_length: int
    n_fft: int
    padding: str
    lookahead_frames: Optional[int]
    bandwidths: Tuple[float, ...]
    models: Tuple[str, ...]

    @property
    def geometry(self) -> Geometry:
        """The variant's :class:`~vocos_triton.contract.Geometry` (frame/sample rules, validation)."""
        return Geometry(self.kind, self.sample_rate, self.input_channels, self.hop_length, self.n_fft,
                        self.padding, self.bandwidths)

    @classmethod
    def of(cls, name: str, geometry: Geometry, lookahead_frames: Optional[int], models: Iterable[str]) -> Variant:
        return cls(name, geometry.kind, geometry.sample_rate, geometry.input_channels, geometry.hop_length,
                   geometry.n_fft, geometry.padding, lookahead_frames, tuple(geometry.bandwidths), tuple(models))


def normalize_variant(variant: Any) -> str:
    """The variant's name (``None`` is :data:`DEFAULT_VARIANT`), or :class:`InvalidInputError` (tensor
    ``None``) for a name that cannot name a variant."""
    if variant is None:
        return DEFAULT_VARIANT
    if not isinstance(variant, str):
        raise InvalidInputError(f"variant: expected a variant name (str) or None, got {type(variant).__name__}")
    try:
        return c.check_variant_name(variant)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def check_kind(kind: Any) -> str:
    """``kind`` if it is ``"mel"`` or ``"encodec"``, else ``ValueError``."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected 'mel' or 'encodec', got {kind!r}")
    return kind


def config_parameters(response: Any) -> Dict[str, str]:
    """A ``ModelConfigResponse`` (protobuf, as ``get_model_config`` returns it) as ``{key: string_value}``."""
    config = getattr(response, "config", response)
    return {key: value.string_value for key, value in config.parameters.items()}


def has_geometry(parameters: Mapping[str, str]) -> bool:
    """Whether a config publishes a geometry at all (a repository made before variants does not)."""
    return any(str(parameters.get(key, "")).strip() for key in c.GeometryParameter.GEOMETRY)


def parse_geometry(parameters: Mapping[str, str], model: str, kind: str) -> Geometry:
    """The geometry model ``model`` publishes, which must be of ``kind``; ``ValueError`` saying what is
    wrong (a missing or malformed parameter, another kind)."""
    geometry = Geometry.from_parameters(parameters, where=f"model {model}")
    if geometry.kind != kind:
        raise ValueError(f"model {model}: parameter {c.GeometryParameter.KIND!r} is {geometry.kind!r}, "
                         f"expected {kind!r}")
    return geometry


def geometry_kind(input_kind: str, bandwidth: Any) -> str:
    """The kind of vocoder an input needs: ``mel=`` and ``audio=`` without a bandwidth the mel one,
    ``codes=`` and ``audio=`` with a bandwidth the EnCodec one."""
    if input_kind == "mel" or (input_kind == "audio" and bandwidth is None):
        return c.MEL
    return c.ENCODEC


def is_missing_model(error: VocosError) -> bool:
    """Whether a model config request failed because the server has no such model."""
    if isinstance(error, ServerUnavailableError):  # includes "has no available versions": reloading
        return False
    text = error.server_message or error.message
    return error.status == _NOT_FOUND or bool(_UNKNOWN_MODEL.search(text))


def lookahead(parameters: Optional[Mapping[str, str]]) -> Optional[int]:
    """The ``lookahead_frames`` parameter of a streaming model's config, ``None`` when absent."""
    text = str((parameters or {}).get(LOOKAHEAD_PARAMETER, "")).strip()
    return int(text) if text.isdigit() else None


# -- the list of variants ----------------------------------------------------------------------------
def group_models(names: Iterable[str]) -> Dict[Tuple[str, str], List[str]]:
    """``{(variant, kind): [its models, in VARIANT_MODELS order]}`` for every (variant, kind) whose
    vocoder is among ``names`` (Triton model names); other names are ignored."""
    present = set(names)
    found: Dict[Tuple[str, str], List[str]] = {}
    variants = sorted({c.split_model_name(name)[1] for name in present})
    for variant in variants:
        try:
            c.check_variant_name(variant)
        except ValueError:
            continue  # not a variant of ours (e.g. some other model with "__" in its name)
        for kind in KINDS:
            if c.variant_model(VOCODERS[kind], variant) not in present:
                continue
            found[(variant, kind)] = [c.variant_model(model, variant) for model in VARIANT_MODELS[kind]
                                      if c.variant_model(model, variant) in present]
    return found


def configs_to_read(names: Iterable[str]) -> List[str]:
    """The configs :func:`variants_from_models` needs: each variant's vocoder and streaming model."""
    wanted = []
    for (variant, kind), models in group_models(names).items():
        wanted.append(c.variant_model(VOCODERS[kind], variant))
        streamer = c.variant_model(STREAMERS[kind], variant)
        if streamer in models:
            wanted.append(streamer)
    return wanted


def variants_from_models(names: Iterable[str], parameters: Mapping[str, Mapping[str, str]]) -> List[Variant]:
    """The variants a server holds, from its model names and the config parameters of the models
    :func:`configs_to_read` names (``{model: {key: value}}``).

    A default-variant vocoder whose config has no geometry (a repository made before variants) has the
    charactr geometry (:data:`~vocos_triton.contract.DEFAULT_GEOMETRY`); a named one must publish it
    (``ValueError`` otherwise). Sorted by (name != "default", name, kind).
    """
    found = []
    for (variant, kind), models in group_models(names).items():
        vocoder = c.variant_model(VOCODERS[kind], variant)
        published = parameters.get(vocoder, {})
        if variant == DEFAULT_VARIANT and not has_geometry(published):
            geometry = DEFAULT_GEOMETRY[kind]
        else:
            geometry = parse_geometry(published, vocoder, kind)
        streamer = c.variant_model(STREAMERS[kind], variant)
        frames = lookahead(parameters.get(streamer)) if streamer in models else None
        found.append(Variant.of(variant, geometry, frames, models))
    return sorted(found, key=lambda v: (v.name != DEFAULT_VARIANT, v.name, v.kind))


def read_variants(names: Iterable[str], parameters: Mapping[str, Mapping[str, str]],
                  cache: Optional[GeometryCache] = None) -> List[Variant]:
    """:func:`variants_from_models`, a malformed geometry as :class:`ServerError`; each published geometry
    goes into ``cache`` too."""
    try:
        found = variants_from_models(names, parameters)
    except ValueError as exc:
        raise ServerError(f"the server publishes no usable geometry: {exc}") from None
    if cache is not None:
        for variant in found:
            if has_geometry(parameters.get(c.variant_model(VOCODERS[variant.kind], variant.name), {})):
                cache.put(variant.name, variant.kind, variant.geometry)
    return found


def describe_variants(names: Iterable[str]) -> str:
    """``default (mel, encodec), matcha-22k (mel)``: what a server holds, from its model names only."""
    kinds: Dict[str, List[str]] = {}
    for variant, kind in group_models(names):
        kinds.setdefault(variant, []).append(kind)
    order = sorted(kinds, key=lambda name: (name != DEFAULT_VARIANT, name))
    return ", ".join(f"{name} ({', '.join(kinds[name])})" for name in order)


def model_names(statistics: Any) -> List[str]:
    """The model names of a ``ModelStatisticsResponse`` (every loaded model, each once)."""
    return list(dict.fromkeys(stat.name for stat in statistics.model_stats))


def missing_variant(variant: str, kind: str, names: Optional[Iterable[str]]) -> InvalidInputError:
    """The error for a variant the server does not hold (``names``: the server's models, when known)."""
    model = c.variant_model(VOCODERS[kind], variant)
    message = f"variant: the server has no {kind} variant {variant!r} (no model {model})"
    if names is not None:
        held = describe_variants(names)
        message += f"; it has: {held}" if held else "; it has no variants"
    return InvalidInputError(message)


def server_geometry_error(error: ValueError, variant: str) -> ServerError:
    return ServerError(f"variant {variant!r}: the server publishes no usable geometry: {error}")


# -- the geometry cache ------------------------------------------------------------------------------
class GeometryCache:
    """Geometries learnt from the server, per (variant, kind); thread-safe.

    Only what the server published is kept. The default variant's fallback (the charactr geometry, used
    while the server cannot be reached or publishes none) is never cached, so that the server is asked
    again on the next call.
    """

    def __init__(self) -> None:
        self._known: Dict[Tuple[str, str], Geometry] = {}
        self._lock = threading.Lock()

    def get(self, variant: str, kind: str) -> Optional[Geometry]:
        with self._lock:
            return self._known.get((variant, kind))

    def learn(self, variant: str, kind: str, parameters: Mapping[str, str]) -> Geometry:
        """The geometry in a vocoder's config parameters, cached; the default variant's fallback when the
        config has none; :class:`ServerError` when it is malformed."""
        model = c.variant_model(VOCODERS[kind], variant)
        if variant == DEFAULT_VARIANT and not has_geometry(parameters):
            log.debug("%s publishes no geometry; using the default %s", model, DEFAULT_GEOMETRY[kind].describe())
            return DEFAULT_GEOMETRY[kind]
        try:
            geometry = parse_geometry(parameters, model, kind)
        except ValueError as exc:
            raise server_geometry_error(exc, variant) from None
        self.put(variant, kind, geometry)
        return geometry

    def put(self, variant: str, kind: str, geometry: Geometry) -> None:
        with self._lock:
            self._known[(variant, kind)] = geometry

    def forget(self, variant: Optional[str] = None) -> None:
        """Drop what was learnt (about ``variant``, or everything)."""
        with self._lock:
            for key in [k for k in self._known if variant is None or k[0] == variant]:
                del self._known[key]
