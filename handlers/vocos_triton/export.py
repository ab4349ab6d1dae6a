"""Build the model repository: checkpoints -> verified artifacts + provenance.

For every Python-backend model of the contract this writes ``<repo>/<model>/1/model.pt`` (TorchScript;
``codebooks.npy`` for ``encodec_embedding``, which runs in numpy, see :mod:`vocos_triton.codebooks`)
and ``<repo>/<model>/1/provenance.json``. Before writing, each module is checked twice on a ragged
batch of probe lengths: the eager module against the reference packages (``vocos`` / ``encodec``),
and the TorchScript module against the eager one; the codebook table against the reference alone.
An artifact that disagrees is not written.

Command line (``make repository``)::

    python -m vocos_triton.export --output model_repository \\
        [--mel SRC] [--encodec SRC] [--encodec-checkpoint PATH] [--random-weights DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import checkpoints as ck
from .codebooks import TABLE_FILE, CodebookTable
from .contract import BANDWIDTHS, CODEBOOKS
from .encoder import EncodecEncoder
from .features import MelFeatures
from .quantized import fidelity, quantize_vocoder, set_quantized_engine
from .random_checkpoints import WARNING as RANDOM_WARNING
from .random_checkpoints import synthetic_voice, write_all
from .serving.torchscript import ARTIFACT  # the file the serving models load
from .vocoder import BatchedVocos

log = logging.getLogger("vocos_triton.export")

PROVENANCE = "provenance.json"
REFERENCE_TOLERANCE = 1e-4  # eager module vs the reference packages, per item
SCRIPT_TOLERANCE = 1e-5  # TorchScript artifact vs the eager module
PROBE_SAMPLES = (513, 7_777, 24_000, 50_001)  # minimum mel length, odd lengths, 1 s, ~2 s
PRECISIONS = ("fp32", "int8")
INT8_MIN_SNR_DB = 25.0  # the opt-in int8 vocoders measure about 30-33 dB against fp32 on speech
TEMPLATE_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


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
    name: str
    module: Union[torch.nn.Module, CodebookTable]
    probe: Probe
    sources: Dict[str, object]
    #: None: must equal the reference to REFERENCE_TOLERANCE; else the least SNR (dB) an approximation needs
    min_snr_db: Optional[float] = None
    precision: str = "fp32"


def quantized(artifact: Artifact) -> Artifact:
    """The opt-in int8 version of a vocoder artifact (see :mod:`vocos_triton.quantized`)."""
    set_quantized_engine()
    return Artifact(artifact.name, quantize_vocoder(artifact.module), artifact.probe, artifact.sources,
                    min_snr_db=INT8_MIN_SNR_DB, precision="int8")


def _max_error(outputs: torch.Tensor, probe: Probe) -> float:
    return max(float((probe.cut(outputs, i).double() - e.double()).abs().max()) for i, e in enumerate(probe.expected))


def _probe_audio() -> List[torch.Tensor]:
    voice = synthetic_voice(seconds=3.0, seed=7)
    return [voice[:n] for n in PROBE_SAMPLES]


def _references(
    mel: Optional[ck.VocosCheckpoint], vocos_encodec: Optional[ck.VocosCheckpoint], encodec: Optional[ck.EncodecCheckpoint]
) -> List[Artifact]:
    """The five artifacts with their probes (reference outputs computed by the reference packages)."""
    artifacts: List[Artifact] = []
    audio = _probe_audio()
    lengths = torch.tensor([a.shape[-1] for a in audio])
    with torch.inference_mode():
        if mel is not None:
            reference = ck.build_reference_vocos(mel)
            sources = ck.describe_sources(mel)
            mels = [reference.feature_extractor(a[None])[0] for a in audio]
            frames = torch.tensor([m.shape[-1] for m in mels])
            artifacts.append(Artifact(
                "mel_features", MelFeatures(reference.feature_extractor),
                Probe((pad_batch(audio), lengths), mels), sources))
            waves = [reference.decode(m[None])[0] for m in mels]
            artifacts.append(Artifact(
                "vocos_mel", BatchedVocos(reference),
                Probe((pad_batch(mels), frames, torch.zeros_like(frames)), waves), sources))
        if vocos_encodec is not None and encodec is not None:
            reference = ck.build_reference_vocos(vocos_encodec, encodec)
            sources = ck.describe_sources(vocos_encodec, encodec)
            extractor = reference.feature_extractor
            bandwidth_ids = torch.arange(len(audio)) % len(BANDWIDTHS)
            num_codebooks = torch.tensor([CODEBOOKS[int(b)] for b in bandwidth_ids])
            codes = []
            for a, b in zip(audio, bandwidth_ids):
                extractor.encodec.set_target_bandwidth(BANDWIDTHS[int(b)])
                codes.append(extractor.get_encodec_codes(a[None])[:, 0])  # (K, T)
            artifacts.append(Artifact(
                "encodec_encoder", EncodecEncoder(extractor.encodec),
                Probe((pad_batch(audio), lengths, num_codebooks), codes), sources))
            features = [reference.codes_to_features(c)[0] for c in codes]
            table = CodebookTable(extractor.codebook_weights.detach().cpu().numpy(), extractor.encodec.quantizer.bins)
            artifacts.append(Artifact("encodec_embedding", table, Probe(tuple(codes), features), sources))
            waves = [reference.decode(f[None], bandwidth_id=b.view(1))[0] for f, b in zip(features, bandwidth_ids)]
            frames = torch.tensor([f.shape[-1] for f in features])
            artifacts.append(Artifact(
                "vocos_encodec", BatchedVocos(reference),
                Probe((pad_batch(features), frames, bandwidth_ids), waves), sources))
    return artifacts


def _snr_db(outputs: torch.Tensor, probe: Probe) -> float:
    """The worst item's SNR (dB) of the module's outputs against the reference outputs."""
    return min(fidelity(e, probe.cut(outputs, i))["snr_db"] for i, e in enumerate(probe.expected))


def script_and_verify(artifact: Artifact, freeze: bool = True) -> Tuple[torch.jit.ScriptModule, Dict[str, float]]:
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
            raise ParityError(f"{artifact.name}: {artifact.precision} module has an SNR of "
                              f"{extra['min_snr_db_vs_reference']:.1f} dB against the reference (< {artifact.min_snr_db})")
    scripted = torch.jit.script(module)
    if freeze:
        exported = [name for name in ("output_samples", "output_frames") if hasattr(module, name)]
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


def verify_table(artifact: Artifact) -> Dict[str, float]:
    """Check the numpy codebook table against the reference's ``codes_to_features``, item by item."""
    error = max(float(np.abs(artifact.module.features(codes.numpy()) - expected.numpy()).max())
                for codes, expected in zip(artifact.probe.inputs, artifact.probe.expected))
    if error > REFERENCE_TOLERANCE:
        raise ParityError(f"{artifact.name}: the codebook table differs from the reference by {error:.3g}")
    return {"max_abs_error_vs_reference": error, "probe_items": len(artifact.probe.expected)}


def copy_template(output: Path, template: Path = TEMPLATE_REPOSITORY) -> None:
    """Copy the committed configs and model.py files into ``output`` (a repository elsewhere)."""
    if output.resolve() == template.resolve():
        return
    shutil.copytree(template, output, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(ARTIFACT, TABLE_FILE, PROVENANCE, "__pycache__"))


def build_repository(
    output: Path,
    mel: Optional[ck.VocosCheckpoint],
    vocos_encodec: Optional[ck.VocosCheckpoint],
    encodec: Optional[ck.EncodecCheckpoint],
    random_weights: bool = False,
    freeze: bool = True,
    precision: str = "fp32",
) -> Dict[str, Dict[str, object]]:
    """Write every artifact that the given checkpoints allow; returns the provenance per model.

    ``precision="int8"`` (opt-in) writes int8 vocoders (the other models stay fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    copy_template(output)
    written = {}
    for artifact in _references(mel, vocos_encodec, encodec):
        if precision == "int8" and isinstance(artifact.module, BatchedVocos):
            artifact = quantized(artifact)
        version_dir = output / artifact.name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(artifact.module, CodebookTable):
            parity = verify_table(artifact)
            path = version_dir / TABLE_FILE
            artifact.module.save(path)
        else:
            scripted, parity = script_and_verify(artifact, freeze=freeze)
            path = version_dir / ARTIFACT
            torch.jit.save(scripted, str(path))
        provenance = {
            "model": artifact.name,
            "random_weights": random_weights,
            "warning": RANDOM_WARNING if random_weights else None,
            "sources": artifact.sources,
            "torch_version": torch.__version__,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "frozen": freeze if path.name == ARTIFACT else None,
            "precision": artifact.precision,
            "parity": parity,
            "artifact": {"file": path.name, "bytes": path.stat().st_size, "sha256": ck.sha256_of(path)},
        }
        (version_dir / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        written[artifact.name] = provenance
        log.info("%s: %s, %d bytes, parity vs reference %.2e, script vs eager %s", artifact.name, path.name,
                 path.stat().st_size, parity["max_abs_error_vs_reference"],
                 f"{parity['max_abs_error_script_vs_eager']:.2e}" if "max_abs_error_script_vs_eager" in parity else "n/a")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Vocos Triton model repository from checkpoints.")
    parser.add_argument("--output", type=Path, default=TEMPLATE_REPOSITORY)
    parser.add_argument("--mel", default=ck.MEL_HUB_ID, help="hub id or local dir of the mel Vocos")
    parser.add_argument("--encodec", default=ck.ENCODEC_VOCOS_HUB_ID, help="hub id or local dir of the EnCodec Vocos")
    parser.add_argument("--encodec-checkpoint", default=None,
                        help=f"path of {ck.ENCODEC_CHECKPOINT_NAME} (default: torch hub cache, else download)")
    parser.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                        help="DEMO ONLY: write random-initialised checkpoints into DIR and build from them")
    parser.add_argument("--no-freeze", action="store_true", help="keep the TorchScript modules unfrozen")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="opt-in int8 vocoders (CPU only; fidelity recorded in provenance.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.random_weights:
        banner = "#" * 100
        log.warning("%s\n# %s\n%s", banner, RANDOM_WARNING, banner)
        paths = write_all(args.random_weights)
        mel_source, encodec_source, encodec_checkpoint = (
            str(paths["vocos_mel"]), str(paths["vocos_encodec"]), str(paths["encodec"]))
    else:
        mel_source, encodec_source, encodec_checkpoint = args.mel, args.encodec, args.encodec_checkpoint
    try:
        mel = ck.load_vocos_checkpoint(mel_source, expected_variant="mel")
        vocos_encodec = ck.load_vocos_checkpoint(encodec_source, expected_variant="encodec")
        encodec = ck.load_encodec_checkpoint(encodec_checkpoint)
        build_repository(args.output, mel, vocos_encodec, encodec, random_weights=bool(args.random_weights),
                         freeze=not args.no_freeze, precision=args.precision)
    except ck.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"error: refusing to write an artifact: {exc}", file=sys.stderr)
        return 3
    log.info("model repository ready: %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
