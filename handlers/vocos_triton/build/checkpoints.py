"""Finding and loading checkpoints, with sha256 provenance.

Sources:
- Vocos: a Hugging Face hub id or a local directory, in either layout (detected, see
  :func:`detect_layout`): upstream ``vocos`` (``config.yaml`` + ``pytorch_model.bin``, e.g.
  ``charactr/vocos-mel-24khz``) or the transformers port's (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, e.g. ``Manel/vocos-mel-24khz``; read by :mod:`.hf_layout` into upstream names).
  Either way :func:`load_vocos_checkpoint` returns the same :class:`VocosCheckpoint`.
- EnCodec 24 kHz: the ``encodec`` package's checkpoint ``encodec_24khz-d7cc33bc.th`` (a plain
  ``state_dict``), from a path, the torch hub cache, or a download from the package's own URL.

A checkpoint's geometry (sample rate, mel bins, n_fft, hop, padding; :class:`~vocos_triton.contract.Geometry`)
and backbone shape are read from its config (:func:`checkpoint_geometry`, :func:`backbone_shape`); what cannot
be served (an IMDCT head, a front end and a head that disagree, a hop that does not divide n_fft, ...) is
refused when the checkpoint is loaded, with the config file and the field in the message.

Two traps of ``vocos`` 0.1.0 are handled here: ``EncodecFeatures`` always downloads EnCodec, so the
reference model is built around an EnCodec model we load ourselves; and ``Vocos.from_pretrained``
replaces ``feature_extractor.encodec.*`` with the EnCodec checkpoint's weights, which we do as well.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import yaml

from ..contract import BANDWIDTHS, CENTER, ENCODEC, ENCODEC_DIM, ENCODEC_HOP, ENCODEC_SAMPLE_RATE, MEL, SAME, Geometry

MEL_HUB_ID = "charactr/vocos-mel-24khz"
ENCODEC_VOCOS_HUB_ID = "charactr/vocos-encodec-24khz"
ENCODEC_CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
ENCODEC_OFFICIAL_SHA256 = "d7cc33bcf1aad7f2dad9836f36431530744abeace3ca033005e3290ed4fa47bf"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CHECKPOINT_NAME
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "pytorch_model.bin"
HF_CONFIG_FILE = "config.json"  # the transformers layout (see hf_layout.py, which names its other files)
HF_SAFETENSORS_FILE = "model.safetensors"
UPSTREAM, TRANSFORMERS = "upstream", "transformers"  # the two layouts

_FEATURE_EXTRACTORS = {
    "vocos.feature_extractors.MelSpectrogramFeatures": "mel",
    "vocos.feature_extractors.EncodecFeatures": "encodec",
}
_BACKBONE = "vocos.models.VocosBackbone"
_HEAD = "vocos.heads.ISTFTHead"
#: vocos classes that exist but cannot be served, and why
_UNSERVED = {
    "vocos.heads.IMDCTSymExpHead": "IMDCT heads are not served; the exported vocoder and the streaming cuts are "
                                   "built on the ISTFT head's overlap-add",
    "vocos.heads.IMDCTCosHead": "IMDCT heads are not served; the exported vocoder and the streaming cuts are "
                                "built on the ISTFT head's overlap-add",
    "vocos.models.VocosResNetBackbone": "VocosResNetBackbone is not served; the masked batched backbone and the "
                                        "streaming state are built on VocosBackbone's ConvNeXt blocks",
}
#: the only EnCodec a Vocos may be conditioned on here (its encoder makes the frames; 48 kHz EnCodec is not served)
ENCODEC_MODEL = "encodec_24khz"

HOW_TO_PROVIDE_WEIGHTS = """\
How to provide weights:
  1. Local copies of the hub repositories (each a folder with config.yaml + pytorch_model.bin, or the
     transformers layout: config.json + model.safetensors or pytorch_model.bin, see docs/weights.md):
       make serve VOCOS_MEL=/path/to/vocos-mel-24khz VOCOS_ENCODEC=/path/to/vocos-encodec-24khz \\
                  ENCODEC_CHECKPOINT=/path/to/encodec_24khz-d7cc33bc.th
     (download them where the Hugging Face Hub is reachable:
       huggingface-cli download charactr/vocos-mel-24khz --local-dir vocos-mel-24khz, and
       EnCodec from https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th)
  2. A warm Hugging Face cache (HF_HOME) and torch hub cache (TORCH_HOME) copied onto this machine.
  3. A DEMO WITH RANDOM WEIGHTS (the server then makes noise, not speech):
       make serve RANDOM_WEIGHTS=1"""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not in the upstream format."""


class WeightsUnavailable(CheckpointError):
    """No local copy and the hub (or download URL) cannot be reached."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True``; a clear error for a missing or corrupt file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return state


@dataclass
class VocosCheckpoint:
    """A Vocos checkpoint in upstream terms, whatever layout it came in: the config.yaml sections and the
    state_dict under ``vocos``' key names."""

    source: str
    directory: Path
    variant: str  # "mel" or "encodec"
    config: dict
    state_dict: Dict[str, torch.Tensor]
    sha256: Dict[str, str] = field(default_factory=dict)  # file name -> sha256, every file read
    layout: str = UPSTREAM
    #: how a transformers-layout checkpoint was read (key layout, port commits, where codebooks came from)
    details: Dict[str, object] = field(default_factory=dict)
    #: for messages: the config file's name of an upstream field (``backbone.init_args.input_channels`` ->
    #: ``n_mels``) where the file's layout names it otherwise; empty for the upstream layout
    field_names: Dict[str, str] = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        """What turns this checkpoint's frames into samples and back (see :func:`checkpoint_geometry`)."""
        return checkpoint_geometry(self)

    @property
    def config_path(self) -> Path:
        return self.directory / (CONFIG_FILE if self.layout == UPSTREAM else HF_CONFIG_FILE)

    @property
    def weights_path(self) -> Path:
        names = [name for name in self.sha256 if name != self.config_path.name]
        return self.directory / (names[0] if names else WEIGHTS_FILE)

    @property
    def codebooks_from_encodec(self) -> bool:
        """True when the layout carries no codebook_weights (the port's nested EnCodec layout): the
        EnCodec checkpoint's first codebooks stand in, as upstream initialises them."""
        return self.variant == "encodec" and "feature_extractor.codebook_weights" not in self.state_dict


@dataclass
class EncodecCheckpoint:
    """The EnCodec 24 kHz checkpoint (``EncodecModel.state_dict()``)."""

    source: str
    path: Path
    state_dict: Dict[str, torch.Tensor]
    sha256: str

    @property
    def official(self) -> bool:
        return self.sha256 == ENCODEC_OFFICIAL_SHA256


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _hub_unreachable_reason() -> Optional[str]:
    """Why the hub cannot be reached, found in seconds; None if it answers.

    huggingface_hub retries a failing connection for about 25 s; an offline ``make serve`` should
    say what to do at once instead.
    """
    if env_flag("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as exc:
        return f"{endpoint.hostname}:{port} unreachable: {exc}"
    return None


def _hub_snapshot(repo_id: str, choices: List[List[str]], need_all: bool = True) -> Optional[Path]:
    """The snapshot folder of ``repo_id`` holding the files of the first choice of ``allow_patterns`` that
    the hub has (all of them, or any one with ``need_all=False``): every choice in the local cache first,
    then on the network. None when the repository has none of them; :class:`WeightsUnavailable` when it
    cannot be asked."""
    from huggingface_hub import snapshot_download

    def complete(folder: Path, patterns: List[str]) -> bool:
        return (all if need_all else any)((folder / name).is_file() for name in patterns)

    for patterns in choices:
        try:
            folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # not cached (huggingface_hub raises several types)
            continue
        if complete(folder, patterns):
            return folder
    wanted = " or ".join(" + ".join(patterns) for patterns in choices)
    reason = _hub_unreachable_reason()
    if reason is None:
        for patterns in choices:
            try:
                folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns, etag_timeout=10))
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                break
            if complete(folder, patterns):
                return folder
        else:
            return None
    raise WeightsUnavailable(f"Could not get {wanted} of {repo_id!r} from the Hugging Face Hub ({reason}) "
                             f"and they are not in the local cache.\n{HOW_TO_PROVIDE_WEIGHTS}")


def _download_from_hub(repo_id: str) -> Path:
    """The hub snapshot folder of ``repo_id`` holding one layout's files (cache first, then network):
    the configs first, to learn the layout, then only that layout's weights (safetensors before .bin)."""
    configs = _hub_snapshot(repo_id, [[CONFIG_FILE, HF_CONFIG_FILE]], need_all=False)
    if configs is None:
        raise CheckpointError(f"{repo_id}: the hub repository has neither {CONFIG_FILE} (upstream vocos layout) "
                              f"nor {HF_CONFIG_FILE} (transformers layout)")
    if detect_layout(configs) == UPSTREAM:
        choices = [[CONFIG_FILE, WEIGHTS_FILE]]
    else:
        choices = [[HF_CONFIG_FILE, HF_SAFETENSORS_FILE], [HF_CONFIG_FILE, WEIGHTS_FILE]]
    folder = _hub_snapshot(repo_id, choices)
    if folder is None:
        raise CheckpointError(f"{repo_id}: the hub repository has {choices[0][0]} but none of the weight files "
                              f"{' or '.join(c[1] for c in choices)}")
    return folder


def detect_layout(directory: Path) -> str:
    """UPSTREAM (``config.yaml``) or TRANSFORMERS (``config.json``); anything else is a CheckpointError."""
    upstream, transformers = (directory / CONFIG_FILE).is_file(), (directory / HF_CONFIG_FILE).is_file()
    if upstream and transformers:
        raise CheckpointError(f"{directory}: holds both {CONFIG_FILE} (upstream vocos layout) and {HF_CONFIG_FILE} "
                              "(transformers layout); expected one layout per folder")
    if upstream:
        return UPSTREAM
    if transformers:
        return TRANSFORMERS
    found = sorted(p.name for p in directory.iterdir())[:8] if directory.is_dir() else []
    raise CheckpointError(
        f"{directory}: unknown checkpoint layout (found {found}); expected {CONFIG_FILE} + {WEIGHTS_FILE} "
        f"(upstream vocos) or {HF_CONFIG_FILE} + {HF_SAFETENSORS_FILE} or {WEIGHTS_FILE} (transformers)")


def _validate_config(config: object, where: Path, field_names: Optional[Mapping[str, str]] = None) -> str:
    """Checks the three ``class_path`` entries and everything :func:`config_geometry` checks; returns the
    variant name. ``field_names``: the file's names of upstream fields (the transformers layout), for messages."""
    return config_geometry(config, where, field_names)[0]


def _reference_class(class_path: str) -> type:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class _ConfigReader:
    """One config's ``init_args``, completed with the reference classes' defaults, and the words for a refusal:
    ``<config file>: <field> is <value> ...`` with the field in dotted form (or the file's own name for it)."""

    def __init__(self, config: dict, where: Path, field_names: Optional[Mapping[str, str]]) -> None:
        self.config = config
        self.where = where
        self.field_names = dict(field_names or {})
        self.values: Dict[str, object] = {}
        self.defaulted: Dict[str, str] = {}  # dotted field -> the class whose default filled it

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {message}")

    def name(self, dotted: str) -> str:
        return self.field_names.get(dotted, dotted)

    def show(self, dotted: str) -> str:
        """``backbone.init_args.dim is 512`` (``... (left out: ISTFTHead default)`` for a default)."""
        text = f"{self.name(dotted)} is {self.values[dotted]!r}"
        if dotted in self.defaulted:
            text += f" (left out: {self.defaulted[dotted]} default)"
        return text

    def read_section(self, section: str) -> Dict[str, object]:
        """``section``'s init_args completed with its class' defaults (read from the class' signature);
        an argument the class does not take, or a required one left out, is refused here (vocos would raise
        a TypeError when building the model)."""
        class_path = self.config[section]["class_path"]
        cls = _reference_class(class_path)
        given = self.config[section].get("init_args") or {}
        if not isinstance(given, dict):
            raise self.error(f"{section}.init_args is {given!r}; expected a mapping of {cls.__name__}'s arguments")
        parameters = {name: p for name, p in inspect.signature(cls).parameters.items()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        args: Dict[str, object] = {}
        for name, value in given.items():
            dotted = f"{section}.init_args.{name}"
            if name not in parameters:
                if name == "win_length":  # vocos' ISTFT and mel windows are n_fft long, always
                    raise self.error(f"{self.name(dotted)} is {value!r}, but {cls.__name__} has no win_length: its "
                                     "window is n_fft samples long (win_length = n_fft), which the batched "
                                     "overlap-add relies on; leave win_length out")
                raise self.error(f"{self.name(dotted)} is not an argument of {class_path} (it takes "
                                 f"{', '.join(parameters)})")
            args[name] = self.values[dotted] = value
        for name, parameter in parameters.items():
            if name in args:
                continue
            dotted = f"{section}.init_args.{name}"
            if parameter.default is inspect.Parameter.empty:
                raise self.error(f"{self.name(dotted)} is missing; {class_path} requires it")
            args[name] = self.values[dotted] = parameter.default
            self.defaulted[dotted] = cls.__name__
        return args

    def positive_int(self, dotted: str, minimum_words: str = "a positive whole number") -> int:
        value = self.values[dotted]
        if not _is_positive_int(value):
            raise self.error(f"{self.show(dotted)}; expected {minimum_words}")
        return value  # type: ignore[return-value]

    def padding(self, dotted: str) -> str:
        value = self.values[dotted]
        if value not in (CENTER, SAME):
            raise self.error(f"{self.show(dotted)}; expected {CENTER!r} or {SAME!r}")
        return value  # type: ignore[return-value]

    def same(self, first: str, second: str, why: str) -> None:
        if self.values[first] != self.values[second]:
            raise self.error(f"{self.show(first)} but {self.show(second)}; {why}")


def config_geometry(config: object, where: Path,
                    field_names: Optional[Mapping[str, str]] = None) -> Tuple[str, Geometry, Dict[str, int]]:
    """(variant, :class:`Geometry`, backbone shape) of a config in upstream terms (the config.yaml sections);
    :class:`CheckpointError` naming ``where`` and the field for anything that cannot be served."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a mapping with feature_extractor, backbone and head")
    for section in ("feature_extractor", "backbone", "head"):
        if not isinstance(config.get(section), dict) or "class_path" not in config[section]:
            raise CheckpointError(f"{where}: missing section {section!r} with a class_path")
    extractor = config["feature_extractor"]["class_path"]
    if extractor not in _FEATURE_EXTRACTORS:
        raise CheckpointError(f"{where}: feature_extractor {extractor!r} is not supported "
                              f"(feature_extractor.class_path); expected one of {sorted(_FEATURE_EXTRACTORS)}")
    for section, expected in (("backbone", _BACKBONE), ("head", _HEAD)):
        class_path = config[section]["class_path"]
        if class_path in _UNSERVED:
            raise CheckpointError(f"{where}: {section}.class_path is {class_path!r}: {_UNSERVED[class_path]}; "
                                  f"expected {expected}")
        if class_path != expected:
            raise CheckpointError(f"{where}: {section} {class_path!r} is not supported ({section}.class_path); "
                                  f"expected {expected}")
    variant = _FEATURE_EXTRACTORS[extractor]
    read = _ConfigReader(config, where, field_names)
    read.read_section("feature_extractor")
    read.read_section("backbone")
    read.read_section("head")
    fe, bb, hd = "feature_extractor.init_args.", "backbone.init_args.", "head.init_args."

    # the backbone
    for name in ("input_channels", "dim", "intermediate_dim"):
        read.positive_int(bb + name)
    read.positive_int(bb + "num_layers", "at least 1 (ConvNeXt blocks)")
    read.positive_int(hd + "dim")
    read.same(hd + "dim", bb + "dim", "the head projects the backbone's output, so they must be equal")

    # the head: an ISTFT whose overlap-add the batched and streaming vocoders slice by hop
    n_fft, hop = read.positive_int(hd + "n_fft"), read.positive_int(hd + "hop_length")
    padding = read.padding(hd + "padding")
    if n_fft % 2:
        raise read.error(f"{read.show(hd + 'n_fft')}; expected an even n_fft (the head predicts n_fft / 2 + 1 "
                         "frequency bins as magnitude and phase halves of n_fft + 2 outputs)")
    if hop >= n_fft:
        raise read.error(f"{read.show(hd + 'hop_length')} but {read.show(hd + 'n_fft')}; expected hop_length < "
                         "n_fft (overlapping ISTFT frames)")
    if n_fft % hop:
        raise read.error(f"{read.show(hd + 'hop_length')} but {read.show(hd + 'n_fft')}, not a multiple of it; "
                         "the batched overlap-add adds hop-sized slices of each n_fft-long frame, so n_fft must "
                         "be a multiple of hop_length")
    if padding == SAME and (n_fft - hop) % 2:
        raise read.error(f"{read.show(hd + 'padding')} with {read.show(hd + 'n_fft')} and "
                         f"{read.show(hd + 'hop_length')}: 'same' trims (n_fft - hop_length) / 2 samples at each "
                         "end, so n_fft - hop_length must be even")

    adanorm = bb + "adanorm_num_embeddings"
    if variant == MEL:
        rate, n_mels = read.positive_int(fe + "sample_rate"), read.positive_int(fe + "n_mels")
        read.positive_int(fe + "n_fft")
        read.positive_int(fe + "hop_length")
        read.padding(fe + "padding")
        read.same(bb + "input_channels", fe + "n_mels", "the backbone reads one input channel per mel bin")
        agree = "the served mel front end and the vocoder must agree"
        read.same(fe + "n_fft", hd + "n_fft", f"{agree} (the mel's STFT and the head's ISTFT frame the audio alike)")
        read.same(fe + "hop_length", hd + "hop_length",
                  f"{agree}: a mel made at one hop and decoded at another is wrong-rate audio")
        read.same(fe + "padding", hd + "padding",
                  f"{agree}: with different paddings the frames the front end makes and the samples the vocoder "
                  "makes from them do not line up")
        if read.values[adanorm] is not None:
            raise read.error(f"{read.show(adanorm)}, but a mel Vocos has no bandwidth to condition on; "
                             "expected it left out (null)")
        geometry = Geometry(MEL, rate, n_mels, hop, n_fft, padding)
    else:
        model = read.values[fe + "encodec_model"]
        if model != ENCODEC_MODEL:
            raise read.error(f"{read.show(fe + 'encodec_model')}; expected {ENCODEC_MODEL!r} (the EnCodec that the "
                             "encodec_encoder model serves; 48 kHz EnCodec is not served)")
        bandwidths = read.values[fe + "bandwidths"]
        numbers = isinstance(bandwidths, (list, tuple)) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in bandwidths)
        if not numbers or [float(b) for b in bandwidths] != list(BANDWIDTHS):
            raise read.error(f"{read.show(fe + 'bandwidths')}; expected exactly {list(BANDWIDTHS)} (a bandwidth id "
                             "indexes this list, in requests and in the backbone's adaptive norms)")
        if read.values[bb + "input_channels"] != ENCODEC_DIM:
            raise read.error(f"{read.show(bb + 'input_channels')}; expected {ENCODEC_DIM}, the dimension of "
                             "EnCodec 24 kHz's embeddings")
        if hop != ENCODEC_HOP:
            raise read.error(f"{read.show(hd + 'hop_length')}; expected {ENCODEC_HOP}: EnCodec 24 kHz makes one "
                             f"frame per {ENCODEC_HOP} samples, which fixes the vocoder's hop")
        if read.values[adanorm] != len(BANDWIDTHS) or not _is_positive_int(read.values[adanorm]):
            raise read.error(f"{read.show(adanorm)}; expected {len(BANDWIDTHS)}, one adaptive-norm embedding per "
                             f"bandwidth of {read.name(fe + 'bandwidths')}")
        geometry = Geometry(ENCODEC, ENCODEC_SAMPLE_RATE, ENCODEC_DIM, hop, n_fft, padding, BANDWIDTHS)
    shape = {name: int(read.values[bb + name]) for name in ("dim", "intermediate_dim", "num_layers")}  # type: ignore
    return variant, geometry, shape


def checkpoint_geometry(checkpoint: VocosCheckpoint) -> Geometry:
    """The checkpoint's :class:`Geometry`, read from its config: for the mel kind the front end's sample rate,
    mel bins, n_fft, hop and padding (vocos' defaults for fields left out); for the EnCodec kind EnCodec
    24 kHz's rate, 128 channels and 320-sample hop with the head's n_fft and padding, and the bandwidths.
    :class:`CheckpointError` naming the config file and the field for what cannot be served."""
    return config_geometry(checkpoint.config, checkpoint.config_path, checkpoint.field_names)[1]


def backbone_shape(checkpoint: VocosCheckpoint) -> Dict[str, int]:
    """``{"dim", "intermediate_dim", "num_layers"}`` of the checkpoint's VocosBackbone."""
    return config_geometry(checkpoint.config, checkpoint.config_path, checkpoint.field_names)[2]


def load_vocos_checkpoint(source: str, expected_variant: Optional[str] = None) -> VocosCheckpoint:
    """Load a Vocos checkpoint from a local directory or a hub id, in either layout (detected).

    Raises :class:`CheckpointError` for an unknown layout, missing/corrupt files, a wrong config, or (the
    transformers layout) a missing, unexpected or misshapen key; :class:`WeightsUnavailable` when a hub id
    cannot be fetched.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        directory = local
    elif _looks_like_hub_id(source) and not local.exists():
        directory = _download_from_hub(source)
    else:
        raise CheckpointError(f"{source}: neither a directory with {CONFIG_FILE} + {WEIGHTS_FILE} "
                              f"(or {HF_CONFIG_FILE} + weights) nor a hub id")
    if detect_layout(directory) == TRANSFORMERS:
        checkpoint = _load_transformers_layout(source, directory)
    else:
        checkpoint = _load_upstream_layout(source, directory)
    if expected_variant is not None and checkpoint.variant != expected_variant:
        raise CheckpointError(f"{checkpoint.config_path}: a {checkpoint.variant} Vocos checkpoint, "
                              f"but a {expected_variant} one was expected")
    return checkpoint


def _load_upstream_layout(source: str, directory: Path) -> VocosCheckpoint:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (a Vocos checkpoint has {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{config_path}: not valid YAML ({exc})") from exc
    variant = _validate_config(config, config_path)
    return VocosCheckpoint(
        source=source,
        directory=directory,
        variant=variant,
        config=config,
        state_dict=load_state_dict(weights_path),
        sha256={CONFIG_FILE: sha256_of(config_path), WEIGHTS_FILE: sha256_of(weights_path)},
    )


def _load_transformers_layout(source: str, directory: Path) -> VocosCheckpoint:
    from . import hf_layout  # imports CheckpointError from here

    read = hf_layout.read(directory)  # checks the mapped config with config_geometry before building anything
    _validate_config(read.config, directory / HF_CONFIG_FILE, read.field_names)
    return VocosCheckpoint(
        source=source,
        directory=directory,
        variant=read.variant,
        config=read.config,
        state_dict=read.state_dict,
        sha256={name: sha256_of(path) for name, path in read.files.items()},
        layout=TRANSFORMERS,
        details=read.details,
        field_names=read.field_names,
    )


def _torch_hub_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ENCODEC_CHECKPOINT_NAME


def locate_encodec_checkpoint(source: Optional[str] = None) -> Path:
    """Path of the EnCodec 24 kHz checkpoint: ``source`` (file or folder), else the torch hub cache,
    else a download from the ``encodec`` package's URL (verified against its sha256)."""
    if source:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / ENCODEC_CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (expected the EnCodec checkpoint {ENCODEC_CHECKPOINT_NAME})")
        return path
    cached = _torch_hub_cache_path()
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(ENCODEC_URL, str(cached), hash_prefix=ENCODEC_OFFICIAL_SHA256[:8],
                                       progress=False)
    except Exception as exc:
        raise WeightsUnavailable(
            f"Could not download {ENCODEC_CHECKPOINT_NAME} ({type(exc).__name__}: {exc}).\n{HOW_TO_PROVIDE_WEIGHTS}"
        ) from exc
    return cached


def load_encodec_checkpoint(source: Optional[str] = None) -> EncodecCheckpoint:
    path = locate_encodec_checkpoint(source)
    return EncodecCheckpoint(
        source=source or str(path), path=path, state_dict=load_state_dict(path), sha256=sha256_of(path)
    )


def build_encodec_model(checkpoint: EncodecCheckpoint) -> torch.nn.Module:
    """``EncodecModel.encodec_model_24khz`` with the checkpoint's weights (no download)."""
    from encodec import EncodecModel

    model = EncodecModel.encodec_model_24khz(pretrained=False)
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint.path}: not an EnCodec 24 kHz state_dict ({exc})") from exc
    return model.eval()


@contextlib.contextmanager
def _encodec_factory_returning(model: torch.nn.Module) -> Iterator[None]:
    """Make ``vocos``' ``EncodecFeatures`` use ``model`` instead of downloading EnCodec (vocos 0.1.0 trap)."""
    from vocos import feature_extractors

    original = feature_extractors.EncodecModel.encodec_model_24khz
    feature_extractors.EncodecModel.encodec_model_24khz = staticmethod(lambda pretrained=True, repository=None: model)
    try:
        yield
    finally:
        feature_extractors.EncodecModel.encodec_model_24khz = original


def _vocos_from_config(config: dict) -> torch.nn.Module:
    """``Vocos.from_hparams`` on the parsed config sections (the transformers layout has no config.yaml)."""
    from vocos import Vocos
    from vocos.pretrained import instantiate_class

    parts = {name: instantiate_class(args=(), init=config[name]) for name in ("feature_extractor", "backbone", "head")}
    return Vocos(**parts)


def build_reference_vocos(
    checkpoint: VocosCheckpoint, encodec: Optional[EncodecCheckpoint] = None
) -> torch.nn.Module:
    """The reference ``vocos.Vocos`` exactly as ``Vocos.from_pretrained`` builds it, from local files."""
    state_dict = dict(checkpoint.state_dict)
    if checkpoint.variant == "encodec":
        if encodec is None:
            raise CheckpointError("the EnCodec-variant Vocos needs the EnCodec 24 kHz checkpoint")
        with _encodec_factory_returning(build_encodec_model(encodec)):
            model = _vocos_from_config(checkpoint.config)
        # As Vocos.from_pretrained does: EnCodec's weights come from the EnCodec checkpoint.
        state_dict.update(
            {"feature_extractor.encodec." + k: v for k, v in model.feature_extractor.encodec.state_dict().items()}
        )
        if checkpoint.codebooks_from_encodec:  # EncodecFeatures built them from this EnCodec model's codebooks
            state_dict["feature_extractor.codebook_weights"] = model.feature_extractor.codebook_weights.detach().clone()
    else:
        model = _vocos_from_config(checkpoint.config)
    mismatch = _state_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{checkpoint.weights_path}: does not match {checkpoint.config_path}: {mismatch}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint.weights_path}: does not match {checkpoint.config_path} ({exc})") from exc
    return model.eval()


def _state_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], shown: int = 3) -> str:
    """What keeps ``got`` (the weights file) from loading into a model with ``expected`` (built from the config):
    missing keys, unexpected keys and shapes, a few of each; "" when it loads."""
    def some(items: List[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    missing = [k for k in expected if k not in got]  # in the model's order: the embedding first
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k!r} is {tuple(got[k].shape)} in the weights, {tuple(expected[k].shape)} for the config"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing key(s) {some([repr(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected key(s) {some([repr(k) for k in unexpected])}")
    if shapes:
        problems.append(f"shape mismatch: {some(shapes)}")
    return "; ".join(problems)


def describe_sources(*items: object) -> Dict[str, object]:
    """Provenance entries (source, files and their sha256) for a provenance JSON."""
    described: Dict[str, object] = {}
    for item in items:
        if isinstance(item, VocosCheckpoint):
            described[f"vocos_{item.variant}"] = {
                "source": item.source,
                "layout": item.layout,
                "directory": str(item.directory),
                "files": sorted(item.sha256),
                "sha256": item.sha256,
                **({"transformers": item.details} if item.details else {}),
            }
        elif isinstance(item, EncodecCheckpoint):
            described["encodec_24khz"] = {
                "source": item.source,
                "path": str(item.path),
                "sha256": item.sha256,
                "official": item.official,
            }
    return described


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
