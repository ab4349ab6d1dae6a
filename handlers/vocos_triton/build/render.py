"""Model configs for a checkpoint's geometry and for variants, rendered from the committed templates.

Every model's ``config.pbtxt`` under ``model_repository/`` is a template at the default (charactr
24 kHz) geometry, with comments that explain its choices. A built repository needs each model's config
to say what its artifact is: the ``mel`` dims and the geometry ``parameters`` (sample rate, bins, n_fft,
hop, padding; :class:`vocos_triton.contract.Geometry`), the streaming model's ``lookahead_frames``, and,
for a variant, its own model names (:func:`vocos_triton.contract.variant_model`) in the config, its
instance groups and its ensemble steps. :func:`render_config` makes exactly those edits on the template's
text, so its comments survive, and then parses the result and checks that every edit landed and nothing
else changed: a template that lacks a key, or a name left unrenamed, fails the build (sherpa's renderer
fails on unknown or leftover keys the same way).

A variant runs one instance of each model (``single_instance``): its memory is what a variant costs
(docs/weights.md); the default variant keeps the template's two instances (no 500 ms batcher stall).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..contract import Tensor


class RenderError(ValueError):
    """A template cannot be rendered as asked (a key it lacks, a name left over)."""


def _rename(text: str, old: str, new: str) -> str:
    """Every quoted ``"old"`` and ``"old_<i>"`` (instance groups and host policies) becomes ``"new..."``."""
    return re.sub(rf'"{re.escape(old)}((?:_\d+)?)"', lambda m: f'"{new}{m.group(1)}"', text)


def _set_parameter(text: str, key: str, value: str, where: str) -> str:
    pattern = re.compile(rf'(key: "{re.escape(key)}"\s*\n\s*value: {{ string_value: ")([^"]*)(" }})')
    if len(pattern.findall(text)) != 1:
        raise RenderError(f"{where}: expected one parameter {key!r} in the template (key and value on two lines)")
    return pattern.sub(lambda m: m.group(1) + value + m.group(3), text)


def _set_channels(text: str, tensor: str, channels: int, where: str) -> str:
    pattern = re.compile(rf'(name: "{re.escape(tensor)}"\s*\n\s*data_type: TYPE_FP32\s*\n\s*dims: \[ )(\d+)(, -1 \])')
    if not pattern.search(text):
        raise RenderError(f"{where}: no {tensor!r} tensor with dims [ C, -1 ] in the template")
    return pattern.sub(lambda m: f"{m.group(1)}{channels}{m.group(3)}", text)


def _keep_first_instance(text: str, model: str, where: str) -> str:
    """Drop every instance group but ``<model>_0`` (groups are blocks ``{ name: "<model>_<i>" ... }``)."""
    pattern = re.compile(rf',\n\s*{{\n\s*name: "{re.escape(model)}_[1-9]\d*"\n[^{{}}]*}}')
    return pattern.sub("", text)


def load(text: str, where: str) -> mc.ModelConfig:
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise RenderError(f"{where}: does not parse after rendering ({exc})") from exc
    return config


def render_config(template: str, where: str, *, renames: Mapping[str, str], parameters: Mapping[str, str],
                  channels: Optional[Dict[str, int]] = None, single_instance: bool = False,
                  header: str = "") -> Tuple[str, mc.ModelConfig]:
    """``template`` (a config.pbtxt's text) with ``renames`` (model names, old -> new), ``parameters`` (values of
    keys the template has), ``channels`` (tensor -> first dim), and only its first instance group when
    ``single_instance``; verified by parsing. ``where`` names the template in errors. Returns the text and the
    config it parses to."""
    text = template
    for key, value in parameters.items():
        text = _set_parameter(text, key, value, where)
    for tensor, count in (channels or {}).items():
        text = _set_channels(text, tensor, count, where)
    original = load(template, where)
    if single_instance and original.platform != "ensemble":
        text = _keep_first_instance(text, original.name, where)
    for old, new in renames.items():
        text = _rename(text, old, new)
    text = header + text
    rendered = load(text, where)
    _verify(original, rendered, where, renames, parameters, channels or {}, single_instance)
    return text, rendered


def _verify(original: mc.ModelConfig, rendered: mc.ModelConfig, where: str, renames: Mapping[str, str],
            parameters: Mapping[str, str], channels: Mapping[str, int], single_instance: bool) -> None:
    name = renames.get(original.name, original.name)
    if rendered.name != name:
        raise RenderError(f"{where}: rendered name {rendered.name!r}, expected {name!r}")
    for key, value in parameters.items():
        if rendered.parameters[key].string_value != value:
            raise RenderError(f"{where}: parameter {key!r} is {rendered.parameters[key].string_value!r} after "
                              f"rendering, expected {value!r}")
    for tensor in [*rendered.input, *rendered.output]:
        if tensor.name in channels and tensor.dims[0] != channels[tensor.name]:
            expected = [channels[tensor.name], -1]
            raise RenderError(f"{where}: {tensor.name} dims {list(tensor.dims)}, expected {expected}")
    for group in rendered.instance_group:
        if not group.name.startswith(rendered.name + "_") or not group.host_policy.startswith(rendered.name + "_"):
            raise RenderError(f"{where}: instance group {group.name!r} (host policy {group.host_policy!r}) does "
                              f"not carry the model's name {rendered.name!r}")
    if single_instance and original.platform != "ensemble" and len(rendered.instance_group) != 1:
        raise RenderError(f"{where}: expected one instance group after rendering, got {len(rendered.instance_group)}")
    for step in rendered.ensemble_scheduling.step:
        wanted = renames.get(step.model_name, step.model_name)
        if step.model_name != wanted:
            raise RenderError(f"{where}: ensemble step {step.model_name!r} left unrenamed")


def feature_channels(geometry_kind: str, channels: int) -> Dict[str, int]:
    """The tensors whose first dim is the geometry's input channels (mel bins; EnCodec's 128 is fixed)."""
    return {Tensor.MEL: channels} if geometry_kind == "mel" else {}


def write(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` already holds it (a committed template rendered as it is stays untouched)."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
