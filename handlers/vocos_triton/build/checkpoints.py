"""Finding and loading checkpoints in their upstream formats, with sha256 provenance.

Sources:
- Vocos: a Hugging Face hub id (``charactr/vocos-mel-24khz``, ``charactr/vocos-encodec-24khz``) or a
  local directory holding ``config.yaml`` + ``pytorch_model.bin``, the files the hub repository has.
- EnCodec 24 kHz: the ``encodec`` package's checkpoint ``encodec_24khz-d7cc33bc.th`` (a plain
  ``state_dict``), from a path, the torch hub cache, or a download from the package's own URL.

Two traps of ``vocos`` 0.1.0 are handled here: ``EncodecFeatures`` always downloads EnCodec, so the
reference model is built around an EnCodec model we load ourselves; and ``Vocos.from_pretrained``
replaces ``feature_extractor.encodec.*`` with the EnCodec checkpoint's weights, which we do as well.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
import yaml

MEL_HUB_ID = "charactr/vocos-mel-24khz"
ENCODEC_VOCOS_HUB_ID = "charactr/vocos-encodec-24khz"
ENCODEC_CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
ENCODEC_OFFICIAL_SHA256 = "d7cc33bcf1aad7f2dad9836f36431530744abeace3ca033005e3290ed4fa47bf"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CHECKPOINT_NAME
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "pytorch_model.bin"

_FEATURE_EXTRACTORS = {
    "vocos.feature_extractors.MelSpectrogramFeatures": "mel",
    "vocos.feature_extractors.EncodecFeatures": "encodec",
}
_BACKBONE = "vocos.models.VocosBackbone"
_HEAD = "vocos.heads.ISTFTHead"

HOW_TO_PROVIDE_WEIGHTS = """\
How to provide weights:
  1. Local copies of the hub repositories (each a folder with config.yaml + pytorch_model.bin):
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
    """A Vocos checkpoint as upstream ships it: its parsed config and its state_dict."""

    source: str
    directory: Path
    variant: str  # "mel" or "encodec"
    config: dict
    state_dict: Dict[str, torch.Tensor]
    sha256: Dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE


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


def _download_from_hub(repo_id: str) -> Path:
    """The hub snapshot folder of ``repo_id`` holding both files (cache first, then network)."""
    from huggingface_hub import hf_hub_download

    def fail(filename: str, reason: str) -> WeightsUnavailable:
        return WeightsUnavailable(
            f"Could not get {filename} of {repo_id!r} from the Hugging Face Hub ({reason}) "
            f"and it is not in the local cache.\n{HOW_TO_PROVIDE_WEIGHTS}")

    paths = []
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            paths.append(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=True))
            continue
        except Exception:
            pass
        reason = _hub_unreachable_reason()
        if reason:
            raise fail(filename, reason)
        try:
            paths.append(hf_hub_download(repo_id=repo_id, filename=filename, etag_timeout=10))
        except Exception as exc:
            raise fail(filename, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return Path(paths[0]).parent


def _validate_config(config: object, where: Path) -> str:
    """Checks the three ``class_path`` entries; returns the variant name."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a mapping with feature_extractor, backbone and head")
    for section in ("feature_extractor", "backbone", "head"):
        if not isinstance(config.get(section), dict) or "class_path" not in config[section]:
            raise CheckpointError(f"{where}: missing section {section!r} with a class_path")
    extractor = config["feature_extractor"]["class_path"]
    if extractor not in _FEATURE_EXTRACTORS:
        raise CheckpointError(
            f"{where}: feature_extractor {extractor!r} is not supported; expected one of {sorted(_FEATURE_EXTRACTORS)}"
        )
    if config["backbone"]["class_path"] != _BACKBONE:
        raise CheckpointError(f"{where}: backbone {config['backbone']['class_path']!r}; expected {_BACKBONE}")
    if config["head"]["class_path"] != _HEAD:
        raise CheckpointError(f"{where}: head {config['head']['class_path']!r}; expected {_HEAD}")
    return _FEATURE_EXTRACTORS[extractor]


def load_vocos_checkpoint(source: str, expected_variant: Optional[str] = None) -> VocosCheckpoint:
    """Load a Vocos checkpoint from a local directory or a hub id.

    Raises :class:`CheckpointError` for missing/corrupt files or a wrong config, and
    :class:`WeightsUnavailable` when a hub id cannot be fetched.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        directory = local
    elif _looks_like_hub_id(source) and not local.exists():
        directory = _download_from_hub(source)
    else:
        raise CheckpointError(f"{source}: neither a directory with {CONFIG_FILE} + {WEIGHTS_FILE} nor a hub id")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (a Vocos checkpoint has {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{config_path}: not valid YAML ({exc})") from exc
    variant = _validate_config(config, config_path)
    if expected_variant is not None and variant != expected_variant:
        raise CheckpointError(f"{config_path}: a {variant} Vocos checkpoint, but a {expected_variant} one was expected")
    return VocosCheckpoint(
        source=source,
        directory=directory,
        variant=variant,
        config=config,
        state_dict=load_state_dict(weights_path),
        sha256={CONFIG_FILE: sha256_of(config_path), WEIGHTS_FILE: sha256_of(weights_path)},
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
        torch.hub.download_url_to_file(ENCODEC_URL, str(cached), hash_prefix=ENCODEC_OFFICIAL_SHA256[:8], progress=False)
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


def build_encodec_model(checkpoint: EncodecCheckpoint) -> "torch.nn.Module":
    """``EncodecModel.encodec_model_24khz`` with the checkpoint's weights (no download)."""
    from encodec import EncodecModel

    model = EncodecModel.encodec_model_24khz(pretrained=False)
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint.path}: not an EnCodec 24 kHz state_dict ({exc})") from exc
    return model.eval()


@contextlib.contextmanager
def _encodec_factory_returning(model: "torch.nn.Module") -> Iterator[None]:
    """Make ``vocos``' ``EncodecFeatures`` use ``model`` instead of downloading EnCodec (vocos 0.1.0 trap)."""
    from vocos import feature_extractors

    original = feature_extractors.EncodecModel.encodec_model_24khz
    feature_extractors.EncodecModel.encodec_model_24khz = staticmethod(lambda pretrained=True, repository=None: model)
    try:
        yield
    finally:
        feature_extractors.EncodecModel.encodec_model_24khz = original


def build_reference_vocos(
    checkpoint: VocosCheckpoint, encodec: Optional[EncodecCheckpoint] = None
) -> "torch.nn.Module":
    """The reference ``vocos.Vocos`` exactly as ``Vocos.from_pretrained`` builds it, from local files."""
    from vocos import Vocos

    if checkpoint.variant == "encodec":
        if encodec is None:
            raise CheckpointError("the EnCodec-variant Vocos needs the EnCodec 24 kHz checkpoint")
        with _encodec_factory_returning(build_encodec_model(encodec)):
            model = Vocos.from_hparams(str(checkpoint.config_path))
        state_dict = dict(checkpoint.state_dict)
        # As Vocos.from_pretrained does: EnCodec's weights come from the EnCodec checkpoint.
        state_dict.update(
            {"feature_extractor.encodec." + k: v for k, v in model.feature_extractor.encodec.state_dict().items()}
        )
    else:
        model = Vocos.from_hparams(str(checkpoint.config_path))
        state_dict = checkpoint.state_dict
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint.directory / WEIGHTS_FILE}: does not match {checkpoint.config_path} ({exc})"
        ) from exc
    return model.eval()


def describe_sources(*items: object) -> Dict[str, object]:
    """Provenance entries (source, files and their sha256) for a provenance JSON."""
    described: Dict[str, object] = {}
    for item in items:
        if isinstance(item, VocosCheckpoint):
            described[f"vocos_{item.variant}"] = {
                "source": item.source,
                "directory": str(item.directory),
                "sha256": item.sha256,
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
