"""The transformers layout of Vocos checkpoints, read back into the upstream ``vocos`` layout.

The transformers port of Vocos (huggingface/transformers, ``src/transformers/models/vocos/`` and, from its
2026 revisions on, ``src/transformers/models/vocos_encodec/``) publishes the upstream weights under new key
names beside a ``config.json``: ``Manel/vocos-mel-24khz`` and ``Manel/vocos-encodec-24khz`` (the repositories
its documentation and integration tests load) and ``hf-audio/vocos-mel-24khz`` (its conversion script's push
target). This module turns such a folder back into what ``vocos`` 0.1.0 loads (the config.yaml sections and
``Vocos.state_dict()`` names), so the export and its parity checks stay exactly as for the upstream layout.

The port's key names changed across its revisions; the two key layouts its published conversions produced are
read, and which one a file holds is detected from its keys.
The mapping below is the inverse of the port's own conversion scripts, read at these commits:

``flat`` (the port's latest revision, 2026)
    ``src/transformers/models/vocos/convert_vocos_weights_to_hf.py`` @ 5a864366d10c00c66dc865cffeb6bae4b1b9ca59
    and ``src/transformers/models/vocos_encodec/convert_vocos_with_encodec.py`` @ 5a864366d10c;
    modules in ``vocos/modeling_vocos.py`` @ c814c68c1c810d0f22eee8fabed8fcba251ddf97 and
    ``vocos_encodec/modeling_vocos_encodec.py`` @ d55b0f127932580841c9464fd6e72b7775574b5f; configs in
    ``vocos/configuration_vocos.py`` @ fe434ab35c4ad51045c14987aee555a4ff28ae6a and
    ``vocos_encodec/configuration_vocos_encodec.py`` @ c814c68c1c81. The backbone is flattened into the model:
    ``backbone.embed.`` -> ``embed.``, ``backbone.norm.`` -> ``norm.``, ``backbone.convnext.`` -> ``layers.``,
    ``backbone.final_layer_norm.`` -> ``final_layer_norm.``, ``.gamma`` -> ``.layer_scale_parameter``,
    ``head.`` -> ``decoder.`` (``head.out.`` -> ``decoder.out.``), ``head.istft.window`` -> ``decoder.window``;
    EnCodec variant (``model_type`` ``vocos_encodec``) also ``.norm.scale.weight`` -> ``.norm.weight``,
    ``.norm.shift.weight`` -> ``.norm.bias`` (the adaptive norms, shape (4, dim)) and
    ``feature_extractor.codebook_weights`` -> ``codebook_weights`` (a buffer, (16384, 128)).
``nested`` (the port's 2025 revisions)
    ``src/transformers/models/vocos/convert_vocos_weights_to_hf.py`` @ 4583150de4f6be7d4d4ab5358566e2ac2c3a0ef6
    (mel: ``backbone.convnext.`` -> ``backbone.layers.``, ``.gamma`` -> ``.layer_scale_parameter``,
    ``head.out.`` -> ``head.out_proj.``, ``head.istft.window`` -> ``head.window``; an earlier revision of the same
    script kept ``head.istft.window``, accepted too) and ``src/transformers/models/vocos/convert_vocos_with_encodec.py``
    @ c15786d960d887318dea352e56276e4182992a3d (EnCodec variant as a ``VocosModel`` with ``use_adaptive_norm``:
    the same renames plus ``.norm.scale.weight`` -> ``.norm.weight``, ``.norm.shift.weight`` -> ``.norm.bias``);
    configs in ``vocos/configuration_vocos.py`` @ 037a67e1a3a80d8d294bfa687fa1facab0d2f2da (``input_channels``,
    ``hidden_size``, ``istft_padding``, ``sampling_rate``) and the older field names that the c15786d9 script
    passes (``hidden_dim``, ``intermediate_dim``, ``spec_padding``).

What the conversion drops, and where it comes from here:
- ``feature_extractor.mel_spec.*`` (mel variant): the STFT window and mel filterbank, functions of the config
  (sample rate, n_fft, hop, mel bins), not trained weights: recomputed by ``vocos``' ``MelSpectrogramFeatures``.
- ``feature_extractor.encodec.*`` (EnCodec variant): never carried; as upstream ``Vocos.from_pretrained``
  does, EnCodec's weights come from the EnCodec 24 kHz checkpoint (``ENCODEC_CHECKPOINT``), which the
  ``encodec_encoder`` model needs in every layout.
- ``feature_extractor.codebook_weights``: the flat layout carries them (``codebook_weights``); the nested
  EnCodec layout does not (the port's processor took them from ``facebook/encodec_24khz``), so they are then
  taken from the EnCodec checkpoint's first 16 codebooks, which is what upstream initialises them from
  (``EncodecFeatures``, ``train_codebooks: false``); provenance says so.

Not read: the port's ``VocosWithEncodecModel`` revision (``encodec_model.*`` keys, HF-format EnCodec
weights) and sharded checkpoints; both stop with a :class:`CheckpointError`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..contract import BANDWIDTHS, CODEBOOK_SIZE, CODEBOOKS

CONFIG_JSON = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
#: weight files in the order they are preferred (safetensors needs no unpickler at all)
WEIGHT_FILES = (SAFETENSORS_FILE, BIN_FILE)
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

PORT_MEL, PORT_ENCODEC = "vocos", "vocos_encodec"  # the port's model_type values
_CODEBOOKS_KEY = "feature_extractor.codebook_weights"

_FIXED = {  # what upstream VocosBackbone / ConvNeXtBlock hard-code; a config.json that differs cannot be served
    "kernel_size": 7,
    "padding": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}


@dataclass(frozen=True)
class _Field:
    """One upstream config value: the config.json names the port's revisions used, and the defaults of its
    config classes (``VocosConfig`` / ``VocosEncodecConfig``) for a field a config.json leaves out."""

    names: Tuple[str, ...]
    mel_default: object
    encodec_default: object


_FIELDS = {
    "input_channels": _Field(("n_mels", "input_channels", "codebook_dim"), 100, 128),
    "dim": _Field(("hidden_size", "hidden_dim"), 512, 384),
    "intermediate_dim": _Field(("intermediate_size", "intermediate_dim"), 1536, 1152),
    "num_layers": _Field(("num_layers",), 8, 8),
    "n_fft": _Field(("n_fft",), 1024, 1280),
    "hop_length": _Field(("hop_length",), 256, 320),
    "padding": _Field(("istft_padding", "spec_padding"), "center", "same"),
    "sample_rate": _Field(("sample_rate", "sampling_rate"), 24_000, 24_000),
    "bandwidths": _Field(("bandwidths",), list(BANDWIDTHS), list(BANDWIDTHS)),
}

#: the upstream config field each :data:`_FIELDS` value fills (see :func:`_upstream_config`), in dotted form
_UPSTREAM_FIELDS = {
    "feature_extractor.init_args.sample_rate": "sample_rate",
    "feature_extractor.init_args.n_fft": "n_fft",
    "feature_extractor.init_args.hop_length": "hop_length",
    "feature_extractor.init_args.n_mels": "input_channels",
    "feature_extractor.init_args.padding": "padding",
    "feature_extractor.init_args.bandwidths": "bandwidths",
    "backbone.init_args.input_channels": "input_channels",
    "backbone.init_args.dim": "dim",
    "backbone.init_args.intermediate_dim": "intermediate_dim",
    "backbone.init_args.num_layers": "num_layers",
    "head.init_args.dim": "dim",
    "head.init_args.n_fft": "n_fft",
    "head.init_args.hop_length": "hop_length",
    "head.init_args.padding": "padding",
}


@dataclass(frozen=True)
class KeyLayout:
    """One key layout of the port: its marker key and its (transformers regex -> upstream template) rules."""

    name: str
    marker: str
    backbone: str  # prefix of the backbone's keys ("" once flattened)
    head: str  # prefix of the head's keys
    out: str  # the head's output projection
    window: str  # regex of the ISTFT window key(s) after ``head``
    commits: str

    def rules(self, adaptive: bool) -> List[Tuple[re.Pattern, str]]:
        """Inverse of the conversion: (transformers key regex, upstream key template), first match wins.
        ``adaptive`` (EnCodec variant): a norm's ``weight``/``bias`` are upstream AdaLayerNorm's
        ``scale.weight``/``shift.weight`` (an Embedding per bandwidth)."""
        b, h = re.escape(self.backbone), re.escape(self.head)
        norm = "{adaptive}" if adaptive else r"\g<p>"
        raw = [
            (r"codebook_weights", _CODEBOOKS_KEY),
            (rf"{b}embed\.(?P<p>weight|bias)", r"backbone.embed.\g<p>"),
            (rf"{b}norm\.(?P<p>weight|bias)", "backbone.norm." + norm),
            (rf"{b}layers\.(?P<i>\d+)\.layer_scale_parameter", r"backbone.convnext.\g<i>.gamma"),
            (rf"{b}layers\.(?P<i>\d+)\.norm\.(?P<p>weight|bias)", r"backbone.convnext.\g<i>.norm." + norm),
            (rf"{b}layers\.(?P<i>\d+)\.(?P<m>dwconv|pwconv1|pwconv2)\.(?P<p>weight|bias)",
             r"backbone.convnext.\g<i>.\g<m>.\g<p>"),
            (rf"{b}final_layer_norm\.(?P<p>weight|bias)", r"backbone.final_layer_norm.\g<p>"),
            (rf"{h}{re.escape(self.out)}\.(?P<p>weight|bias)", r"head.out.\g<p>"),
            (rf"{h}{self.window}", "head.istft.window"),
        ]
        return [(re.compile(pattern), template) for pattern, template in raw]


KEY_LAYOUTS = (
    KeyLayout("flat", marker="decoder.out.weight", backbone="", head="decoder.", out="out", window=r"window",
              commits="transformers 5a864366d10c (convert scripts), c814c68c1c81 / d55b0f127932 (modeling)"),
    KeyLayout("nested", marker="head.out_proj.weight", backbone="backbone.", head="head.", out="out_proj",
              window=r"(?:istft\.)?window",
              commits="transformers 4583150de4f6 (mel convert script), c15786d960d8 (EnCodec convert script)"),
)


@dataclass
class HfCheckpoint:
    """A transformers-layout folder read back into the upstream names."""

    variant: str  # "mel" or "encodec"
    config: dict  # the config.yaml sections upstream ``vocos`` builds the model from
    state_dict: Dict[str, torch.Tensor]  # upstream key names
    files: Dict[str, Path]  # config + weights file, by name
    details: Dict[str, object] = field(default_factory=dict)  # for provenance
    #: the config.json name of each upstream field (``backbone.init_args.input_channels`` -> ``n_mels``), for messages
    field_names: Dict[str, str] = field(default_factory=dict)

    @property
    def codebooks_from_encodec(self) -> bool:
        return self.variant == "encodec" and _CODEBOOKS_KEY not in self.state_dict


def _error(message: str) -> Exception:
    from .checkpoints import CheckpointError  # checkpoints imports this module lazily; no cycle at import

    return CheckpointError(message)


def weights_file(directory: Path) -> Path:
    """The folder's weight file: ``model.safetensors``, else ``pytorch_model.bin``."""
    for index in SHARD_INDEXES:
        if (directory / index).is_file():
            raise _error(f"{directory / index}: sharded checkpoints are not supported (Vocos fits one file); "
                         f"expected one of {' or '.join(WEIGHT_FILES)}")
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise _error(f"{directory}: file not found: a transformers Vocos checkpoint has {CONFIG_JSON} + "
                 f"{' or '.join(WEIGHT_FILES)}")


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    """safetensors with the ``safetensors`` package, ``.bin`` with ``torch.load(weights_only=True)``."""
    if path.suffix != ".safetensors":
        from .checkpoints import load_state_dict

        return load_state_dict(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _error(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                     "expected a complete safetensors file (a truncated download?)") from exc


def read_config(path: Path) -> Tuple[str, dict]:
    """``config.json`` -> (variant, the upstream config.yaml sections)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise _error(f"{path}: expected a JSON object with the VocosConfig fields")
    model_type = raw.get("model_type")
    if model_type == PORT_ENCODEC:
        variant = "encodec"
    elif model_type == PORT_MEL:
        # the c15786d9 revision stored the EnCodec variant as a VocosModel with adaptive norms
        variant = "encodec" if raw.get("use_adaptive_norm") else "mel"
    else:
        raise _error(f"{path}: model_type {model_type!r} is not a transformers Vocos config; "
                     f"expected {PORT_MEL!r} or {PORT_ENCODEC!r}")
    for name, value in _FIXED.items():
        if name in raw and raw[name] != value:
            raise _error(f"{path}: {name}={raw[name]!r}, but upstream vocos (which the export checks against) "
                         f"fixes {name}={value!r}")
    values = {key: _value(raw, spec, variant, path) for key, spec in _FIELDS.items()}
    if variant == "encodec" and values["bandwidths"] != list(BANDWIDTHS):  # 1.5 == 1.5 for int and float alike
        raise _error(f"{path}: bandwidths={values['bandwidths']!r}; expected {list(BANDWIDTHS)} (the served set)")
    return variant, _upstream_config(variant, values)


def field_names(raw: dict) -> Dict[str, str]:
    """The config.json name of each upstream field it fills, for messages: the name the file uses, or all the
    names the port's revisions used (``n_mels/input_channels/codebook_dim``) when it leaves the field out."""
    names = {}
    for dotted, key in _UPSTREAM_FIELDS.items():
        spec = _FIELDS[key]
        names[dotted] = "/".join([name for name in spec.names if name in raw] or spec.names)
    names["backbone.init_args.adanorm_num_embeddings"] = f"len({names['feature_extractor.init_args.bandwidths']})"
    return names


def _value(raw: dict, spec: _Field, variant: str, path: Path) -> object:
    present = {name: raw[name] for name in spec.names if name in raw}
    if len(set(map(json.dumps, present.values()))) > 1:
        raise _error(f"{path}: {' and '.join(present)} disagree ({present}); expected one value")
    if present:
        return next(iter(present.values()))
    return spec.mel_default if variant == "mel" else spec.encodec_default


def _upstream_config(variant: str, v: dict) -> dict:
    """The config.yaml sections of the upstream hub repositories, filled from the config.json values."""
    backbone = {"input_channels": v["input_channels"], "dim": v["dim"], "intermediate_dim": v["intermediate_dim"],
                "num_layers": v["num_layers"]}
    head = {"dim": v["dim"], "n_fft": v["n_fft"], "hop_length": v["hop_length"], "padding": v["padding"]}
    if variant == "mel":
        extractor = {"class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
                     "init_args": {"sample_rate": v["sample_rate"], "n_fft": v["n_fft"], "hop_length": v["hop_length"],
                                   "n_mels": v["input_channels"], "padding": v["padding"]}}
    else:
        extractor = {"class_path": "vocos.feature_extractors.EncodecFeatures",
                     "init_args": {"encodec_model": "encodec_24khz", "bandwidths": [float(b) for b in v["bandwidths"]],
                                   "train_codebooks": False}}
        backbone["adanorm_num_embeddings"] = len(v["bandwidths"])
    return {"feature_extractor": extractor,
            "backbone": {"class_path": "vocos.models.VocosBackbone", "init_args": backbone},
            "head": {"class_path": "vocos.heads.ISTFTHead", "init_args": head}}


def detect_key_layout(keys: Sequence[str], path: Path) -> KeyLayout:
    for layout in KEY_LAYOUTS:
        if layout.marker in keys:
            return layout
    if any(k.startswith("encodec_model.") for k in keys):
        raise _error(f"{path}: holds 'encodec_model.*' keys (the port's VocosWithEncodecModel revision), "
                     f"which is not supported; expected the key {KEY_LAYOUTS[0].marker!r} (flat layout) or "
                     f"{KEY_LAYOUTS[1].marker!r} (nested layout)")
    raise _error(f"{path}: unknown key layout: neither {KEY_LAYOUTS[0].marker!r} (flat layout) nor "
                 f"{KEY_LAYOUTS[1].marker!r} (nested layout) is present (first keys: {sorted(keys)[:5]})")


def to_upstream_keys(state: Dict[str, torch.Tensor], layout: KeyLayout, adaptive: bool,
                     path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Rename every key; returns the upstream state_dict and the transformers name of each upstream key."""
    rules = layout.rules(adaptive)
    renamed: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for key, value in state.items():
        target = _rename(key, rules)
        if target is None:
            raise _error(f"{path}: unexpected key {key!r}: not a key of the transformers Vocos {layout.name} layout "
                         f"({'EnCodec' if adaptive else 'mel'} variant)")
        if target in renamed:
            raise _error(f"{path}: keys {origin[target]!r} and {key!r} both hold upstream {target!r}; expected one")
        renamed[target], origin[target] = value, key
    return renamed, origin


def _rename(key: str, rules: List[Tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        if "{adaptive}" in template:  # AdaLayerNorm: an Embedding per bandwidth for the scale and the shift
            template = template.replace("{adaptive}", "scale.weight" if match["p"] == "weight" else "shift.weight")
        return match.expand(template)
    return None


def expected_state(config: dict, variant: str) -> Dict[str, torch.Tensor]:
    """What upstream ``vocos`` holds for ``config`` (less EnCodec itself): names, shapes, dtypes, and the
    values of the buffers that are functions of the config (the mel window and filterbank)."""
    from vocos.pretrained import instantiate_class

    with torch.random.fork_rng(), torch.no_grad():  # their random init must not move the caller's RNG
        backbone = instantiate_class(args=(), init=config["backbone"])
        head = instantiate_class(args=(), init=config["head"])
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    state.update({"head." + k: v for k, v in head.state_dict().items()})
    if variant == "mel":
        extractor = instantiate_class(args=(), init=config["feature_extractor"])
        state.update({"feature_extractor." + k: v for k, v in extractor.state_dict().items()})
    else:
        rows = CODEBOOKS[BANDWIDTHS.index(max(config["feature_extractor"]["init_args"]["bandwidths"]))] * CODEBOOK_SIZE
        state[_CODEBOOKS_KEY] = torch.empty(rows, config["backbone"]["init_args"]["input_channels"])
    return state


def read(directory: Path) -> HfCheckpoint:
    """Read and check a transformers-layout folder; every problem is a CheckpointError naming the file,
    the key and what was expected."""
    config_path = directory / CONFIG_JSON
    weights_path = weights_file(directory)
    from .checkpoints import config_geometry

    variant, config = read_config(config_path)
    raw = json.loads(config_path.read_text())
    names = field_names(raw)
    config_geometry(config, config_path, names)  # what cannot be served is refused before anything is built
    state = load_weights(weights_path)
    if not state:
        raise _error(f"{weights_path}: holds no tensors; expected the Vocos weights")
    layout = detect_key_layout(list(state), weights_path)
    model_type = raw.get("model_type")
    renamed, origin = to_upstream_keys(state, layout, adaptive=variant == "encodec", path=weights_path)
    try:
        expected = expected_state(config, variant)
    except Exception as exc:  # a value of the wrong type or range: vocos' constructors raise several types
        raise _error(f"{config_path}: upstream vocos cannot build a model from it ({type(exc).__name__}: {exc}); "
                     f"expected the VocosConfig fields of a published checkpoint") from exc
    # the nested EnCodec layout (a VocosModel with adaptive norms) carries no codebooks; the flat one must
    codebooks_optional = variant == "encodec" and model_type == PORT_MEL
    details: Dict[str, object] = {"model_type": model_type, "key_layout": layout.name, "port_commits": layout.commits}
    for key, reference in expected.items():
        if key.startswith("feature_extractor.mel_spec."):
            if key in renamed:
                raise _error(f"{weights_path}: unexpected key {origin[key]!r}; the port drops the mel front end")
            renamed[key] = reference.clone()  # a function of the config: recomputed, as documented above
            continue
        if key not in renamed:
            if key == _CODEBOOKS_KEY and codebooks_optional:
                details["codebook_weights"] = "from the EnCodec checkpoint (this layout does not carry them)"
                continue
            raise _error(f"{weights_path}: missing key {_hf_name(key, layout, variant)!r} (upstream {key!r}), "
                         f"expected shape {tuple(reference.shape)} for the {layout.name} layout")
        got = renamed[key]
        if tuple(got.shape) != tuple(reference.shape):
            raise _error(f"{weights_path}: key {origin[key]!r} has shape {tuple(got.shape)}, expected "
                         f"{tuple(reference.shape)} (from {config_path.name}: upstream {key!r})")
        if got.dtype != reference.dtype:
            raise _error(f"{weights_path}: key {origin[key]!r} has dtype {got.dtype}, expected {reference.dtype}")
    extra = sorted(set(renamed) - set(expected))
    if extra:
        raise _error(f"{weights_path}: unexpected key {origin[extra[0]]!r} (upstream {extra[0]!r}) for the "
                     f"{variant} variant that {config_path.name} describes")
    if variant == "encodec" and _CODEBOOKS_KEY in renamed:
        details["codebook_weights"] = "from this checkpoint"
    return HfCheckpoint(variant, config, renamed, {config_path.name: config_path, weights_path.name: weights_path},
                        details, names)


def _hf_name(upstream: str, layout: KeyLayout, variant: str) -> str:
    """The transformers name of an upstream key (for messages: which key the file should have had)."""
    for candidate in _candidate_names(upstream, layout):
        if _rename(candidate, layout.rules(variant == "encodec")) == upstream:
            return candidate
    return upstream


def _candidate_names(upstream: str, layout: KeyLayout) -> List[str]:
    name = upstream.replace("feature_extractor.codebook_weights", "codebook_weights")
    name = name.replace("backbone.convnext.", layout.backbone + "layers.").replace(".gamma", ".layer_scale_parameter")
    name = re.sub(r"^backbone\.", layout.backbone, name)
    name = name.replace("head.out.", layout.head + layout.out + ".")
    name = name.replace("head.istft.window", layout.head + "window")
    return [name, name.replace("scale.weight", "weight").replace("shift.weight", "bias")]
