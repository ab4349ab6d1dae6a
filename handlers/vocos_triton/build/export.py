"""Build the model repository: checkpoints -> verified artifacts + provenance.

For every Python-backend model of the contract this writes ``<repo>/<model>/1/model.pt`` (TorchScript;
``codebooks.npy`` for ``encodec_embedding``, which runs in numpy, see :mod:`vocos_triton.serving.codebooks`;
``mel_features`` also gets ``melbank.npz``, its numpy front end for CPU instances, see
:mod:`vocos_triton.serving.melbank`) and ``<repo>/<model>/1/provenance.json``. Before writing, each
module is checked twice on a ragged batch of probe lengths: the eager module against the reference
packages (``vocos`` / ``encodec``), and the TorchScript module against the eager one; the codebook table
and the numpy mel front end against the reference alone. An artifact that disagrees is not written.

Command line (``make repository``)::

    python -m vocos_triton.build.export --output model_repository \\
        [--mel SRC] [--encodec SRC] [--encodec-checkpoint PATH] [--random-weights DIR] [--variant NAME=SRC ...]

Each checkpoint's geometry (sample rate, mel bins, n_fft, hop, padding; :class:`vocos_triton.contract.Geometry`)
is read from its config and written into its models' ``config.pbtxt`` (:mod:`.render`), the default
checkpoints' into the contract's models, each ``--variant``'s into models of its own
(``vocos_mel__NAME``, ...: :func:`vocos_triton.contract.variant_model`).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..contract import (
    BANDWIDTHS,
    CODEBOOKS,
    DEFAULT_VARIANT,
    VARIANT_MODELS,
    VARIANT_SEPARATOR,
    VOCODERS,
    Geometry,
    GeometryParameter,
    Model,
    check_variant_name,
    split_model_name,
    variant_model,
)
from ..launcher.profiles import render_gpu
from ..modules.encoder import EncodecEncoder
from ..modules.features import MelFeatures
from ..modules.streaming import StreamingVocos, decode_in_chunks
from ..modules.vocoder import KERNEL_METHODS, BatchedVocos
from ..paths import DEFAULT_REPOSITORY, template_repository
from ..serving import dfti
from ..serving.codebooks import TABLE_FILE, CodebookTable
from ..serving.melbank import MELBANK_FILE, MelBank
from ..serving.torchscript import ARTIFACT  # the file the serving models load
from . import checkpoints as ck
from . import render
from .half import halve_vocoder
from .quantize import fidelity, quantize_vocoder, set_quantized_engine
from .random_checkpoints import WARNING as RANDOM_WARNING
from .random_checkpoints import synthetic_voice, write_all

log = logging.getLogger("vocos_triton.build.export")

PROVENANCE = "provenance.json"
REFERENCE_TOLERANCE = 1e-4  # eager module vs the reference packages, per item
SCRIPT_TOLERANCE = 1e-5  # TorchScript artifact vs the eager module
MELBANK_TOLERANCE = 1e-5  # the numpy mel front end vs the reference: the same FFT, float32 matmul and log
#: probe lengths besides the front end's minimum: an odd ~0.3 s, 1 s, an odd ~2 s (7_777, 24_000, 50_001 at 24 kHz)
PROBE_SECONDS = ((0.324, True), (1.0, False), (2.0834, True))
PRECISIONS = ("fp32", "int8", "fp16")
INT8_MIN_SNR_DB = 25.0  # a floor below what the opt-in int8 vocoders measure (docs/performance.md)
FP16_MIN_SNR_DB = 40.0  # the opt-in fp16-backbone vocoders (GPU), see vocos_triton.build.half


class ParityError(RuntimeError):
    """An exported module disagrees with its reference; nothing was written for it."""


def pad_batch(items: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Stack tensors that differ only in their last dimension, padding it with ``value``."""
    longest = max(item.shape[-1] for item in items)
    batch = torch.full((len(items), *items[0].shape[:-1], longest), value, dtype=items[0].dtype)
    for i, item in enumerate(items):
        batch[i, ..., : item.shape[-1]] = item
    return batch


@dataclass
class Probe:
    """Inputs of a ragged batch and each item's reference output.

    Item i of the module's padded output is the leading ``expected[i].shape`` corner of ``output[i]``.
    """

    inputs: Tuple[torch.Tensor, ...]
    expected: List[torch.Tensor]

    def cut(self, output: torch.Tensor, i: int) -> torch.Tensor:
        return output[i][tuple(slice(0, n) for n in self.expected[i].shape)]


@dataclass
class Artifact:
    """One model's artifact: it checks itself against its probe and writes itself into a version folder."""

    name: str
    probe: Probe
    sources: Dict[str, object]
    precision: str = "fp32"
    #: the geometry config.pbtxt publishes for this model, and the variant it belongs to
    geometry: Optional[Geometry] = None
    variant: str = DEFAULT_VARIANT
    backbone: Dict[str, int] = field(default_factory=dict)

    def save_verified(self, version_dir: Path, freeze: bool) -> Tuple[Path, Dict[str, object]]:
        """Verify, then write the artifact file; returns its path and the parity figures.
        Raises :class:`ParityError` (and writes nothing) when it disagrees with the reference."""
        raise NotImplementedError


@dataclass
class ModuleArtifact(Artifact):
    """A torch module, saved as TorchScript (``model.pt``)."""

    module: torch.nn.Module = None  # type: ignore[assignment]
    #: None: must equal the reference to REFERENCE_TOLERANCE; else the least SNR (dB) an approximation needs
    min_snr_db: Optional[float] = None

    def quantized(self) -> ModuleArtifact:
        """The opt-in int8 version of a vocoder artifact (see :mod:`vocos_triton.build.quantize`)."""
        set_quantized_engine()
        return replace(self, module=quantize_vocoder(self.module), min_snr_db=INT8_MIN_SNR_DB, precision="int8")

    def halved(self) -> ModuleArtifact:
        """The opt-in fp16-backbone version of a vocoder artifact (see :mod:`vocos_triton.build.half`)."""
        return replace(self, module=halve_vocoder(self.module), min_snr_db=FP16_MIN_SNR_DB, precision="fp16")

    def save_verified(self, version_dir: Path, freeze: bool) -> Tuple[Path, Dict[str, object]]:
        scripted, parity = script_and_verify(self, freeze=freeze)
        path = version_dir / ARTIFACT
        torch.jit.save(scripted, str(path))
        return path, {**parity, "frozen": freeze}


@dataclass
class TableArtifact(Artifact):
    """The numpy codebook table of ``encodec_embedding`` (``codebooks.npy``)."""

    table: CodebookTable = None  # type: ignore[assignment]

    def save_verified(self, version_dir: Path, freeze: bool) -> Tuple[Path, Dict[str, object]]:
        error = max(float(np.abs(self.table.features(codes.numpy()) - expected.numpy()).max())
                    for codes, expected in zip(self.probe.inputs, self.probe.expected))
        if error > REFERENCE_TOLERANCE:
            raise ParityError(f"{self.name}: the codebook table differs from the reference by {error:.3g}")
        path = version_dir / TABLE_FILE
        self.table.save(path)
        return path, {"max_abs_error_vs_reference": error, "probe_items": len(self.probe.expected)}


@dataclass
class MelFeaturesArtifact(ModuleArtifact):
    """``mel_features``: the TorchScript :class:`MelFeatures` (``model.pt``, for GPU instances) and the numpy
    front end's window, filterbank and geometry taken from the same buffers (``melbank.npz``, for CPU
    instances), each checked against the reference before anything is written. Without MKL here the
    numpy front end cannot be checked (see :mod:`vocos_triton.serving.dfti`): only ``model.pt`` is written,
    and CPU instances serve it."""

    def save_verified(self, version_dir: Path, freeze: bool) -> Tuple[Path, Dict[str, object]]:
        features = self.module
        try:
            bank = MelBank(features.window.cpu().numpy(), features.filterbank.cpu().numpy(), features.n_fft,
                           features.hop_length, features.win_length, pad=features.pad)
        except dfti.FftUnavailable as exc:
            log.warning("%s: no %s (CPU instances will serve model.pt with torch): %s", self.name, MELBANK_FILE, exc)
            bank, numpy_parity = None, {"skipped": str(exc)}
        else:
            padded, lengths = self.probe.inputs
            mels = bank([a[: int(n)].numpy() for a, n in zip(padded, lengths)])
            error = max(float(np.abs(m - e.numpy()).max()) for m, e in zip(mels, self.probe.expected))
            if error > MELBANK_TOLERANCE:
                raise ParityError(f"{self.name}: the numpy front end differs from the reference by {error:.3g}")
        path, parity = super().save_verified(version_dir, freeze)
        if bank is not None:
            numpy_path = version_dir / MELBANK_FILE
            bank.save(numpy_path)
            numpy_parity = {"file": numpy_path.name, "bytes": numpy_path.stat().st_size,
                            "sha256": ck.sha256_of(numpy_path), "fft": dfti.version(),
                            "max_abs_error_vs_reference": error}
        return path, {**parity, "numpy": numpy_parity}


#: chunk sizes the streaming export cycles through: single frames, odd sizes, and pieces longer than the
#: receptive field
STREAM_PROBE_CHUNKS = (1, 7, 2, 40, 1, 13, 64, 3)


def probe_chunks(total: int) -> List[int]:
    """:data:`STREAM_PROBE_CHUNKS` repeated until they cover ``total`` frames (the last one cut to fit)."""
    chunks, covered = [], 0
    for size in itertools.cycle(STREAM_PROBE_CHUNKS):
        if covered >= total:
            return chunks
        chunks.append(min(size, total - covered))
        covered += chunks[-1]
    return chunks


@dataclass
class StreamingArtifact(Artifact):
    """A :class:`StreamingVocos` (``model.pt``), checked by decoding each probe item in chunks; for the
    EnCodec variant also the codebook table its stub embeds (``codebooks.npy``)."""

    module: StreamingVocos = None  # type: ignore[assignment]
    conditions: Tuple[int, ...] = ()
    table: Optional[CodebookTable] = None

    def decode(self, module: torch.nn.Module) -> List[torch.Tensor]:
        with torch.inference_mode():
            return [torch.cat(decode_in_chunks(module, features, probe_chunks(features.shape[-1]), condition))
                    for features, condition in zip(self.probe.inputs, self.conditions)]

    def save_verified(self, version_dir: Path, freeze: bool) -> Tuple[Path, Dict[str, object]]:
        module = self.module.eval()
        eager = self.decode(module)
        reference_error = max(float((e - w).abs().max()) for e, w in zip(self.probe.expected, eager))
        if reference_error > REFERENCE_TOLERANCE:
            raise ParityError(f"{self.name}: chunked decoding differs from the reference by {reference_error:.3g}")
        scripted = torch.jit.script(module)
        if freeze:
            scripted = torch.jit.freeze(scripted.eval(), preserved_attrs=["initial_state", "geometry",
                                                                          "lookahead_frames", *KERNEL_METHODS])
        script_error = max(float((e - s).abs().max()) for e, s in zip(eager, self.decode(scripted)))
        if script_error > SCRIPT_TOLERANCE:
            raise ParityError(f"{self.name}: TorchScript module differs from eager by {script_error:.3g}")
        if self.table is not None:
            self.table.save(version_dir / TABLE_FILE)
        path = version_dir / ARTIFACT
        torch.jit.save(scripted, str(path))
        return path, {"max_abs_error_vs_reference": reference_error, "max_abs_error_script_vs_eager": script_error,
                      "probe_items": len(self.probe.expected), "probe_chunks": list(STREAM_PROBE_CHUNKS),
                      "lookahead_frames": int(module.lookahead_frames()), "frozen": freeze}


def _max_error(outputs: torch.Tensor, probe: Probe) -> float:
    return max(float((probe.cut(outputs, i).double() - e.double()).abs().max()) for i, e in enumerate(probe.expected))


def probe_audio(geometry: Geometry) -> List[torch.Tensor]:
    """The probe items at the geometry's rate: the front end's shortest input, then :data:`PROBE_SECONDS`."""
    rate = geometry.sample_rate
    voice = synthetic_voice(seconds=3.0, sample_rate=rate, seed=7)
    lengths = [geometry.min_samples] + [int(seconds * rate) | int(odd) for seconds, odd in PROBE_SECONDS]
    return [voice[:n] for n in lengths]


def _names(variant: str) -> Dict[str, str]:
    return {model: variant_model(model, variant) for kind in VARIANT_MODELS.values() for model in kind}


def mel_artifacts(mel: ck.VocosCheckpoint, variant: str = DEFAULT_VARIANT) -> List[Artifact]:
    """``mel_features``, ``vocos_mel`` and ``vocos_mel_stream`` (of ``variant``), probed with the reference
    ``vocos`` at the checkpoint's geometry."""
    reference = ck.build_reference_vocos(mel)
    names, geometry = _names(variant), mel.geometry
    tags = dict(sources=ck.describe_sources(mel), geometry=geometry, variant=variant,
                backbone=ck.backbone_shape(mel))
    audio = probe_audio(geometry)
    lengths = torch.tensor([a.shape[-1] for a in audio])
    mels = [reference.feature_extractor(a[None])[0] for a in audio]
    frames = torch.tensor([m.shape[-1] for m in mels])
    waves = [reference.decode(m[None])[0] for m in mels]
    return [
        MelFeaturesArtifact(names[Model.MEL_FEATURES], Probe((pad_batch(audio), lengths), mels), **tags,
                            module=MelFeatures(reference.feature_extractor)),
        ModuleArtifact(names[Model.VOCOS_MEL], Probe((pad_batch(mels), frames, torch.zeros_like(frames)), waves),
                       **tags, module=BatchedVocos(reference)),
        StreamingArtifact(names[Model.VOCOS_MEL_STREAM], Probe(tuple(mels), waves), **tags,
                          module=StreamingVocos(BatchedVocos(reference)), conditions=(0,) * len(mels)),
    ]


def encodec_artifacts(vocos_encodec: ck.VocosCheckpoint, encodec: ck.EncodecCheckpoint,
                      variant: str = DEFAULT_VARIANT) -> List[Artifact]:
    """``encodec_encoder`` (the default variant only: every variant shares EnCodec's encoder),
    ``encodec_embedding``, ``vocos_encodec`` and ``decode_codes_stream``, probed with ``vocos`` + ``encodec``
    (item i at bandwidth i mod 4)."""
    reference = ck.build_reference_vocos(vocos_encodec, encodec)
    names, geometry = _names(variant), vocos_encodec.geometry
    tags = dict(sources=ck.describe_sources(vocos_encodec, encodec), geometry=geometry, variant=variant,
                backbone=ck.backbone_shape(vocos_encodec))
    audio = probe_audio(geometry)
    extractor = reference.feature_extractor
    lengths = torch.tensor([a.shape[-1] for a in audio])
    bandwidth_ids = torch.arange(len(audio)) % len(BANDWIDTHS)
    num_codebooks = torch.tensor([CODEBOOKS[int(b)] for b in bandwidth_ids])
    codes = []
    for a, b in zip(audio, bandwidth_ids):
        extractor.encodec.set_target_bandwidth(BANDWIDTHS[int(b)])
        codes.append(extractor.get_encodec_codes(a[None])[:, 0])  # (K, T)
    features = [reference.codes_to_features(c)[0] for c in codes]
    waves = [reference.decode(f[None], bandwidth_id=b.view(1))[0] for f, b in zip(features, bandwidth_ids)]
    frames = torch.tensor([f.shape[-1] for f in features])
    table = CodebookTable(extractor.codebook_weights.detach().cpu().numpy(), extractor.encodec.quantizer.bins)
    encoder = [ModuleArtifact(Model.ENCODEC_ENCODER, Probe((pad_batch(audio), lengths, num_codebooks), codes),
                              **tags, module=EncodecEncoder(extractor.encodec))] if variant == DEFAULT_VARIANT else []
    return encoder + [
        TableArtifact(names[Model.ENCODEC_EMBEDDING], Probe(tuple(codes), features), **tags, table=table),
        ModuleArtifact(names[Model.VOCOS_ENCODEC], Probe((pad_batch(features), frames, bandwidth_ids), waves),
                       **tags, module=BatchedVocos(reference)),
        StreamingArtifact(names[Model.DECODE_CODES_STREAM], Probe(tuple(features), waves), **tags,
                          module=StreamingVocos(BatchedVocos(reference)),
                          conditions=tuple(int(b) for b in bandwidth_ids), table=table),
    ]


def _snr_db(outputs: torch.Tensor, probe: Probe) -> float:
    """The worst item's SNR (dB) of the module's outputs against the reference outputs."""
    return min(fidelity(e, probe.cut(outputs, i))["snr_db"] for i, e in enumerate(probe.expected))


def script_and_verify(artifact: ModuleArtifact, freeze: bool = True) -> Tuple[torch.jit.ScriptModule, Dict[str, float]]:
    """TorchScript ``artifact.module`` and check eager-vs-reference and script-vs-eager parity."""
    module = artifact.module.eval()
    with torch.inference_mode():
        eager_out = module(*artifact.probe.inputs)
    reference_error = _max_error(eager_out, artifact.probe)
    extra: Dict[str, float] = {}
    if artifact.min_snr_db is None:
        if reference_error > REFERENCE_TOLERANCE:
            raise ParityError(f"{artifact.name}: eager module differs from the reference by {reference_error:.3g}")
    else:
        extra["min_snr_db_vs_reference"] = _snr_db(eager_out, artifact.probe)
        if extra["min_snr_db_vs_reference"] < artifact.min_snr_db:
            snr = extra["min_snr_db_vs_reference"]
            raise ParityError(f"{artifact.name}: {artifact.precision} module has an SNR of {snr:.1f} dB against the "
                              f"reference (< {artifact.min_snr_db})")
    scripted = torch.jit.script(module)
    if freeze:
        exported = [name for name in ("output_samples", "output_frames", "geometry", *KERNEL_METHODS)
                    if hasattr(module, name)]
        scripted = torch.jit.freeze(scripted.eval(), preserved_attrs=exported)
    with torch.inference_mode():
        script_out = scripted(*artifact.probe.inputs)
    script_error = float((script_out.double() - eager_out.double()).abs().max()) if eager_out.numel() else 0.0
    if script_error > SCRIPT_TOLERANCE:
        raise ParityError(f"{artifact.name}: TorchScript module differs from eager by {script_error:.3g}")
    return scripted, {
        "max_abs_error_vs_reference": reference_error,
        "max_abs_error_script_vs_eager": script_error,
        "probe_items": len(artifact.probe.expected),
        **extra,
    }


def copy_template(output: Path, template: Optional[Path] = None) -> None:
    """Copy the committed configs and model.py files into ``output`` (a repository elsewhere); the variant
    folders a previous build left in the template (``<model>__<name>``) are not templates and stay behind."""
    template = template or template_repository()
    if output.resolve() == template.resolve():
        return
    artifacts = shutil.ignore_patterns(ARTIFACT, TABLE_FILE, MELBANK_FILE, PROVENANCE, "__pycache__")

    def ignore(folder: str, names: List[str]) -> set:
        ignored = set(artifacts(folder, names))
        if Path(folder).resolve() == template.resolve():
            ignored |= {name for name in names if VARIANT_SEPARATOR in name}
        return ignored

    shutil.copytree(template, output, dirs_exist_ok=True, ignore=ignore)


#: the variant checkpoints of a build: (name, checkpoint), in the order given
Variants = Sequence[Tuple[str, ck.VocosCheckpoint]]


def check_variants(variants: Variants) -> None:
    """Valid, distinct names; ValueError naming the problem."""
    seen = set()
    for name, _ in variants:
        check_variant_name(name)
        if name == DEFAULT_VARIANT:
            raise ValueError(f"variant name {name!r} is reserved for the contract's own models")
        if name in seen:
            raise ValueError(f"variant {name!r} is given twice; each variant needs a name of its own")
        seen.add(name)


def render_configs(output: Path, written: Dict[str, Dict[str, object]], template: Optional[Path] = None) -> None:
    """Each built model's config.pbtxt (and GPU profile) for its checkpoint's geometry, and each variant's
    ensembles, from the committed templates (:mod:`.render`)."""
    template = template or template_repository()
    variants: Dict[str, Dict[str, Dict[str, object]]] = {}
    for name, provenance in written.items():
        variants.setdefault(str(provenance["variant"]), {})[name] = provenance
    for variant, models in variants.items():
        kinds = {str(p["geometry"][GeometryParameter.KIND]) for p in models.values()}
        own = [model for kind in kinds for model in VARIANT_MODELS[kind]]
        renames = {} if variant == DEFAULT_VARIANT else {model: variant_model(model, variant) for model in own}
        built = [split_model_name(name)[0] for name in models]
        for model in [*built, *(m for m in own if m not in built)]:  # the artifacts' models, then the ensembles
            parameters, channels = _published(models.get(variant_model(model, variant)), variant)
            header = "" if variant == DEFAULT_VARIANT else (
                f"# Variant {variant!r}: rendered by `make repository` (vocos_triton.build.render) from "
                f"../{model}/config.pbtxt,\n# with this variant's names, geometry and one instance per model; "
                "the comments below are the template's.\n")
            source = template / model
            text, config = render.render_config((source / "config.pbtxt").read_text(), str(source / "config.pbtxt"),
                                                renames=renames, parameters=parameters, channels=channels,
                                                single_instance=variant != DEFAULT_VARIANT, header=header)
            folder = output / variant_model(model, variant)
            render.write(folder / "config.pbtxt", text)
            if config.platform != "ensemble":
                render.write(folder / "configs" / "gpu.pbtxt", render_gpu(config))
                if variant != DEFAULT_VARIANT:
                    render.write(folder / "1" / "model.py", (source / "1" / "model.py").read_text())
            else:
                (folder / "1").mkdir(parents=True, exist_ok=True)


def _published(provenance: Optional[Dict[str, object]], variant: str) -> Tuple[Dict[str, str], Dict[str, int]]:
    """What a built model's config publishes (its variant, geometry and, for a streaming model, its
    lookahead) and the first dims of its tensors; nothing for an ensemble (no provenance)."""
    if provenance is None:
        return {}, {}
    geometry = dict(provenance["geometry"])
    parameters = {GeometryParameter.VARIANT: variant, **geometry}
    lookahead = provenance["parity"].get("lookahead_frames")
    if lookahead is not None:
        parameters["lookahead_frames"] = str(lookahead)
    kind, channels = geometry[GeometryParameter.KIND], int(geometry[GeometryParameter.INPUT_CHANNELS])
    return parameters, render.feature_channels(kind, channels)


def build_repository(
    output: Path,
    mel: Optional[ck.VocosCheckpoint],
    vocos_encodec: Optional[ck.VocosCheckpoint],
    encodec: Optional[ck.EncodecCheckpoint],
    random_weights: bool = False,
    freeze: bool = True,
    precision: str = "fp32",
    variants: Variants = (),
) -> Dict[str, Dict[str, object]]:
    """Write every artifact that the given checkpoints allow, and each model's config for its geometry;
    returns the provenance per model.

    ``precision="int8"`` (opt-in, CPU) writes int8 vocoders, ``"fp16"`` (opt-in, GPU) vocoders with an
    fp16 backbone; the other models stay fp32. ``variants`` add their models beside the default ones
    (an EnCodec-conditioned variant needs ``encodec``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    check_variants(variants)
    copy_template(output)
    artifacts: List[Artifact] = []
    with torch.inference_mode():
        if mel is not None:
            artifacts += mel_artifacts(mel)
        if vocos_encodec is not None and encodec is not None:
            artifacts += encodec_artifacts(vocos_encodec, encodec)
        for name, checkpoint in variants:
            if checkpoint.variant == "mel":
                artifacts += mel_artifacts(checkpoint, name)
            elif encodec is None:
                raise ck.CheckpointError(f"variant {name!r}: an EnCodec-conditioned Vocos needs the EnCodec 24 kHz "
                                         "checkpoint (--encodec-checkpoint)")
            else:
                artifacts += encodec_artifacts(checkpoint, encodec, name)
    written = {}
    for artifact in artifacts:
        # ``--precision int8`` / ``fp16`` replaces the vocoders' artifacts (every variant's)
        if precision != "fp32" and split_model_name(artifact.name)[0] in VOCODERS.values():
            artifact = artifact.quantized() if precision == "int8" else artifact.halved()
        version_dir = output / artifact.name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        path, parity = artifact.save_verified(version_dir, freeze)
        provenance = {
            "model": artifact.name,
            "variant": artifact.variant,
            "random_weights": random_weights,
            "warning": RANDOM_WARNING if random_weights else None,
            "sources": artifact.sources,
            "geometry": artifact.geometry.parameters() if artifact.geometry else {},
            "backbone": artifact.backbone,
            "torch_version": torch.__version__,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "frozen": parity.pop("frozen", None),
            "precision": artifact.precision,
            "parity": parity,
            "artifact": {"file": path.name, "bytes": path.stat().st_size, "sha256": ck.sha256_of(path)},
        }
        (version_dir / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        written[artifact.name] = provenance
        log.info("%s: %s, %d bytes, parity vs reference %.2e", artifact.name, path.name, path.stat().st_size,
                 parity["max_abs_error_vs_reference"])
    render_configs(output, written)
    return written


def build_repository_atomically(output: Path, *args: object, **kwargs: object) -> Dict[str, Dict[str, object]]:
    """:func:`build_repository` into a staging folder beside ``output``, which replaces ``output`` only once
    every artifact is written and verified: a failure (a bad checkpoint, a parity error, an interrupt) leaves
    the previous repository as it was and no staging folder behind."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        written = build_repository(staging, *args, **kwargs)
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.previous-", dir=output.parent))
            output.rename(retired / output.name)  # two renames on one file system: no half-built moment
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it became ``output``
    return written


def parse_variant(text: str) -> Tuple[str, str]:
    """``NAME=SOURCE`` -> (name, source); ValueError for anything else."""
    name, sep, source = text.partition("=")
    if not sep or not source.strip():
        raise ValueError(f"expected NAME=SOURCE (e.g. matcha-22k=/models/vocos-22k), got {text!r}")
    return check_variant_name(name.strip()), source.strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Vocos Triton model repository from checkpoints.")
    parser.add_argument("--output", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--mel", default=ck.MEL_HUB_ID, help="hub id or local dir of the mel Vocos")
    parser.add_argument("--encodec", default=ck.ENCODEC_VOCOS_HUB_ID, help="hub id or local dir of the EnCodec Vocos")
    parser.add_argument("--encodec-checkpoint", default=None,
                        help=f"path of {ck.ENCODEC_CHECKPOINT_NAME} (default: torch hub cache, else download)")
    parser.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                        help="DEMO ONLY: write random-initialised checkpoints into DIR and build from them")
    parser.add_argument("--no-freeze", action="store_true", help="keep the TorchScript modules unfrozen")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="opt-in int8 vocoders (CPU) or fp16-backbone vocoders (GPU); fidelity recorded "
                             "in provenance.json")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SOURCE",
                        help="add a variant: its models are named <model>__NAME; SOURCE is a hub id or a local folder "
                             "(upstream or transformers layout, any geometry); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        variant_sources = [parse_variant(text) for text in args.variant]
        check_variants([(name, None) for name, _ in variant_sources])  # type: ignore[misc]
    except ValueError as exc:
        print(f"error: --variant: {exc}", file=sys.stderr)
        return 2

    if args.random_weights:
        banner = "#" * 100
        log.warning("%s\n# %s\n%s", banner, RANDOM_WARNING, banner)
        paths = write_all(args.random_weights)
        mel_source, encodec_source, encodec_checkpoint = (
            str(paths[Model.VOCOS_MEL]), str(paths[Model.VOCOS_ENCODEC]), str(paths["encodec"]))
    else:
        mel_source, encodec_source, encodec_checkpoint = args.mel, args.encodec, args.encodec_checkpoint
    try:
        mel = ck.load_vocos_checkpoint(mel_source, expected_variant="mel")
        vocos_encodec = ck.load_vocos_checkpoint(encodec_source, expected_variant="encodec")
        encodec = ck.load_encodec_checkpoint(encodec_checkpoint)
        variants = [(name, ck.load_vocos_checkpoint(source)) for name, source in variant_sources]
        for name, checkpoint in variants:
            log.info("variant %s: %s Vocos, %s (%s)", name, checkpoint.variant, checkpoint.geometry.describe(),
                     checkpoint.source)
        build_repository_atomically(args.output, mel, vocos_encodec, encodec,
                                    random_weights=bool(args.random_weights), freeze=not args.no_freeze,
                                    precision=args.precision, variants=variants)
    except ck.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"error: refusing to write an artifact: {exc}", file=sys.stderr)
        return 3
    except render.RenderError as exc:
        print(f"error: cannot render a model config: {exc}", file=sys.stderr)
        return 3
    log.info("model repository ready: %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
