"""Random-initialised checkpoints in exactly the upstream formats, for tests and the labelled demo.

No pretrained weights can be downloaded on an offline machine, so tests build the models from files
that look exactly like the real ones (same files, key names, shapes and dtypes) but hold random
weights. ``encodec``'s ``pretrained=False`` model has all-zero codebooks (its k-means init never ran),
which would make every code 0 and every EnCodec test pass trivially; here each codebook is seeded
from the random encoder's own residuals on a synthetic signal, as k-means init would do.

Variants (other geometries: sample rate, mel bins, n_fft, hop, padding, backbone size) are written by the
reference package itself, ``vocos``' ``Vocos.from_hparams`` on a config.yaml written here, so their state_dict
(mel window and filterbank buffers included) is exactly what ``vocos`` makes for that config:
:func:`write_random_vocos_variant` (upstream layout) and :func:`write_random_vocos_variant_transformers` (the
transformers port's flat layout, as :mod:`.hf_layout` reads it); :data:`TEST_VARIANTS` and
:func:`write_test_variants` are the variants the test-suite serves.

Command line: ``python -m vocos_triton.build.random_checkpoints OUT_DIR`` writes
``OUT_DIR/vocos-mel-24khz/``, ``OUT_DIR/vocos-encodec-24khz/`` and ``OUT_DIR/encodec_24khz-random.th``;
``--variants`` writes the test variants too (``OUT_DIR/<name>/``).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict

import torch
import yaml

from ..contract import MEL, Geometry, Model
from .checkpoints import CONFIG_FILE, HF_CONFIG_FILE, HF_SAFETENSORS_FILE, TRANSFORMERS, UPSTREAM, WEIGHTS_FILE

# The config.yaml files of the hub repositories, verbatim.
MEL_CONFIG = """\
feature_extractor:
  class_path: vocos.feature_extractors.MelSpectrogramFeatures
  init_args:
    sample_rate: 24000
    n_fft: 1024
    hop_length: 256
    n_mels: 100
    padding: center

backbone:
  class_path: vocos.models.VocosBackbone
  init_args:
    input_channels: 100
    dim: 512
    intermediate_dim: 1536
    num_layers: 8

head:
  class_path: vocos.heads.ISTFTHead
  init_args:
    dim: 512
    n_fft: 1024
    hop_length: 256
    padding: center
"""

ENCODEC_CONFIG = """\
feature_extractor:
  class_path: vocos.feature_extractors.EncodecFeatures
  init_args:
    encodec_model: encodec_24khz
    bandwidths: [1.5, 3.0, 6.0, 12.0]
    train_codebooks: false

backbone:
  class_path: vocos.models.VocosBackbone
  init_args:
    input_channels: 128
    dim: 384
    intermediate_dim: 1152
    num_layers: 8
    adanorm_num_embeddings: 4

head:
  class_path: vocos.heads.ISTFTHead
  init_args:
    dim: 384
    n_fft: 1280
    hop_length: 320
    padding: same
"""

RANDOM_ENCODEC_NAME = "encodec_24khz-random.th"
README_NAME = "RANDOM_WEIGHTS_README.txt"
WARNING = "RANDOM WEIGHTS: these checkpoints are random-initialised test fixtures; they produce noise, not speech."


def synthetic_voice(seconds: float = 20.0, sample_rate: int = 24_000, seed: int = 0) -> torch.Tensor:
    """A voice-like signal (gliding harmonics, noise bursts, pauses) to seed the codebooks, shape (L,)."""
    generator = torch.Generator().manual_seed(seed)
    n = int(seconds * sample_rate)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    f0 = 140 + 60 * torch.sin(2 * math.pi * 0.7 * t) + 25 * torch.sin(2 * math.pi * 3.1 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sample_rate
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 30))
    noise = torch.randn(n, generator=generator, dtype=torch.float64)
    syllables = (torch.sin(2 * math.pi * 4.0 * t) > -0.3).double()
    fricative = (torch.sin(2 * math.pi * 1.3 * t) > 0.8).double()
    signal = syllables * (0.3 * voiced * (1 - fricative) + 0.15 * noise * fricative)
    return (0.5 * signal / signal.abs().max()).float()


def _seed_codebooks(model: torch.nn.Module, seed: int) -> None:
    """Fill every RVQ codebook with residual vectors of the random encoder (k-means-style init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.encoder(synthetic_voice(seed=seed)[None, None, :])  # (1, D, T)
        residual = emb[0].t().contiguous()  # (T, D)
        for layer in model.quantizer.vq.layers:
            codebook = layer._codebook
            size = codebook.codebook_size
            picks = torch.randint(0, residual.shape[0], (size,), generator=generator)
            jitter = 0.05 * residual.std() * torch.randn(size, residual.shape[1], generator=generator)
            embed = residual[picks] + jitter
            codebook.embed.copy_(embed)
            codebook.embed_avg.copy_(embed)
            codebook.cluster_size.fill_(1.0)
            codebook.inited.fill_(1.0)
            indices = codebook.quantize(residual)
            residual = residual - embed[indices]


def write_random_encodec(path: Path, seed: int = 0) -> Path:
    """An EnCodec 24 kHz ``state_dict`` file like ``encodec_24khz-d7cc33bc.th``, random weights."""
    from encodec import EncodecModel

    torch.manual_seed(seed)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    _seed_codebooks(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_random_vocos_mel(directory: Path, seed: int = 0) -> Path:
    """``config.yaml`` + ``pytorch_model.bin`` of a random Vocos mel model (13.5 M parameters)."""
    from vocos import Vocos

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(MEL_CONFIG)
    torch.manual_seed(seed)
    model = Vocos.from_hparams(str(directory / CONFIG_FILE))
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / README_NAME).write_text(WARNING + "\n")
    return directory


def write_random_vocos_encodec(directory: Path, encodec_path: Path, seed: int = 0,
                               **backbone: int) -> Path:
    """``config.yaml`` + ``pytorch_model.bin`` of a random EnCodec-variant Vocos whose
    ``feature_extractor.codebook_weights`` are the (random) EnCodec checkpoint's first 16 codebooks.
    ``backbone`` (``dim``, ``intermediate_dim``, ``num_layers``) changes the hub config's backbone (an
    EnCodec-conditioned variant; the head follows ``dim``)."""
    from vocos.pretrained import instantiate_class

    directory.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(ENCODEC_CONFIG)
    if backbone:
        config["backbone"]["init_args"].update(backbone)
        config["head"]["init_args"]["dim"] = config["backbone"]["init_args"]["dim"]
        _write_config_yaml(directory / CONFIG_FILE, config)
    else:
        (directory / CONFIG_FILE).write_text(ENCODEC_CONFIG)
    torch.manual_seed(seed + 1)
    backbone = instantiate_class(args=(), init=config["backbone"])
    head = instantiate_class(args=(), init=config["head"])
    encodec_state = torch.load(encodec_path, map_location="cpu", weights_only=True)
    num_codebooks = 16  # EncodecFeatures keeps the codebooks that max(bandwidths) = 12 kbps uses
    codebook_weights = torch.cat(
        [encodec_state[f"quantizer.vq.layers.{i}._codebook.embed"] for i in range(num_codebooks)], dim=0
    )
    state: Dict[str, torch.Tensor] = {"feature_extractor.codebook_weights": codebook_weights}
    state.update({"backbone." + k: v for k, v in backbone.state_dict().items()})
    state.update({"head." + k: v for k, v in head.state_dict().items()})
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / README_NAME).write_text(WARNING + "\n")
    return directory


# -- variants: any geometry, written by the reference package -------------------------------------------------
def variant_config(*, sample_rate: int, n_mels: int, n_fft: int, hop_length: int, padding: str, dim: int = 512,
                   intermediate_dim: int = 1536, num_layers: int = 8) -> dict:
    """The config.yaml sections of a mel Vocos with this geometry, laid out as the hub's ``MEL_CONFIG``."""
    return {
        "feature_extractor": {"class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
                              "init_args": {"sample_rate": sample_rate, "n_fft": n_fft, "hop_length": hop_length,
                                            "n_mels": n_mels, "padding": padding}},
        "backbone": {"class_path": "vocos.models.VocosBackbone",
                     "init_args": {"input_channels": n_mels, "dim": dim, "intermediate_dim": intermediate_dim,
                                   "num_layers": num_layers}},
        "head": {"class_path": "vocos.heads.ISTFTHead",
                 "init_args": {"dim": dim, "n_fft": n_fft, "hop_length": hop_length, "padding": padding}},
    }


def _write_config_yaml(path: Path, config: dict) -> None:
    path.write_text("\n".join(yaml.safe_dump({section: config[section]}, sort_keys=False)
                              for section in ("feature_extractor", "backbone", "head")))


def _reference_vocos(config_path: Path, seed: int) -> torch.nn.Module:
    """``Vocos.from_hparams(config_path)``, random-initialised from ``seed`` without moving the caller's RNG."""
    from vocos import Vocos

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Vocos.from_hparams(str(config_path))


def write_random_vocos_variant(directory: Path, *, sample_rate: int, n_mels: int, n_fft: int, hop_length: int,
                               padding: str, dim: int = 512, intermediate_dim: int = 1536, num_layers: int = 8,
                               seed: int = 0) -> Path:
    """``config.yaml`` + ``pytorch_model.bin`` (upstream layout) of a random mel Vocos of this geometry, its
    state_dict the one ``Vocos.from_hparams`` makes from that config.yaml."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = variant_config(sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft, hop_length=hop_length,
                            padding=padding, dim=dim, intermediate_dim=intermediate_dim, num_layers=num_layers)
    _write_config_yaml(directory / CONFIG_FILE, config)
    model = _reference_vocos(directory / CONFIG_FILE, seed)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / README_NAME).write_text(WARNING + "\n")
    return directory


def to_transformers_flat(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A mel Vocos state_dict under the transformers port's ``flat`` key names, as its conversion script
    (``convert_vocos_weights_to_hf.py`` @ 5a864366d10c, see :mod:`.hf_layout`) writes them: the mel front end
    (a function of the config) is dropped, the backbone flattened, ``head.`` becomes ``decoder.``."""
    converted = {}
    for key, value in state.items():
        if key.startswith("feature_extractor."):
            continue
        for old, new in (("backbone.embed.", "embed."), ("backbone.norm.", "norm."), ("backbone.convnext.", "layers."),
                         ("backbone.final_layer_norm.", "final_layer_norm."), (".gamma", ".layer_scale_parameter"),
                         ("head.", "decoder."), ("istft.window", "window")):
            key = key.replace(old, new)
        converted[key] = value.contiguous()
    return converted


def transformers_config(*, sample_rate: int, n_mels: int, n_fft: int, hop_length: int, padding: str, dim: int = 512,
                        intermediate_dim: int = 1536, num_layers: int = 8) -> dict:
    """config.json of the port's ``VocosConfig`` (``configuration_vocos.py`` @ fe434ab35c4a) for this geometry."""
    return {"model_type": "vocos", "architectures": ["VocosModel"], "n_mels": n_mels, "hidden_size": dim,
            "intermediate_size": intermediate_dim, "num_layers": num_layers, "kernel_size": 7, "padding": 3,
            "layer_scale_init_value": 1 / num_layers, "layer_norm_eps": 1e-6, "n_fft": n_fft,
            "hop_length": hop_length, "istft_padding": padding, "sample_rate": sample_rate, "hidden_act": "gelu"}


def _safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def write_random_vocos_variant_transformers(directory: Path, *, sample_rate: int, n_mels: int, n_fft: int,
                                            hop_length: int, padding: str, dim: int = 512,
                                            intermediate_dim: int = 1536, num_layers: int = 8,
                                            seed: int = 0) -> Path:
    """The same random model as :func:`write_random_vocos_variant` (same seed, same weights) in the transformers
    layout: ``config.json`` (``model_type`` "vocos", the port's field names) + ``model.safetensors`` (or
    ``pytorch_model.bin`` where the ``safetensors`` package is not installed), flat key layout."""
    geometry = dict(sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft, hop_length=hop_length, padding=padding,
                    dim=dim, intermediate_dim=intermediate_dim, num_layers=num_layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:  # the reference package builds the model from a config.yaml
        config_path = Path(scratch) / CONFIG_FILE
        _write_config_yaml(config_path, variant_config(**geometry))
        model = _reference_vocos(config_path, seed)
    converted = to_transformers_flat(model.state_dict())
    (directory / HF_CONFIG_FILE).write_text(json.dumps(transformers_config(**geometry), indent=2) + "\n")
    if _safetensors_available():
        from safetensors.torch import save_file

        save_file(converted, str(directory / HF_SAFETENSORS_FILE), metadata={"format": "pt"})
    else:
        torch.save(converted, directory / WEIGHTS_FILE)
    (directory / README_NAME).write_text(WARNING + "\n")
    return directory


@dataclass(frozen=True)
class VariantSpec:
    """One test variant: its geometry, backbone size and checkpoint layout."""

    sample_rate: int
    n_mels: int
    n_fft: int
    hop_length: int
    padding: str
    dim: int = 512
    intermediate_dim: int = 1536
    num_layers: int = 8
    layout: str = UPSTREAM

    def kwargs(self, **overrides: int) -> Dict[str, object]:
        """The writers' keyword arguments (``overrides``: e.g. a smaller backbone for a fast test)."""
        values = {k: v for k, v in asdict(self).items() if k != "layout"}
        values.update(overrides)
        return values

    @property
    def geometry(self) -> Geometry:
        return Geometry(MEL, self.sample_rate, self.n_mels, self.hop_length, self.n_fft, self.padding)

    def write(self, directory: Path, seed: int = 0, **overrides: int) -> Path:
        writer = write_random_vocos_variant if self.layout == UPSTREAM else write_random_vocos_variant_transformers
        return writer(directory, seed=seed, **self.kwargs(**overrides))


#: The variants the test-suite serves beside the default models.
TEST_VARIANTS: Dict[str, VariantSpec] = {
    # Matcha-TTS / HiFi-GAN's LJSpeech front end: 22.05 kHz, 80 mels, 1024 / 256
    "matcha-22k": VariantSpec(22_050, 80, 1024, 256, "center"),
    # a music model: 44.1 kHz, 128 mels, 2048 / 512, 'same' padding, a bigger backbone
    "music-44k": VariantSpec(44_100, 128, 2048, 512, "same", dim=768, intermediate_dim=2304, num_layers=12),
    # 16 kHz speech with a 10 ms hop and a 40 ms window (n_fft 640 = 4 hops), transformers layout
    "tts-16k-hf": VariantSpec(16_000, 80, 640, 160, "center", layout=TRANSFORMERS),
}


def write_test_variants(root: Path, seed: int = 0) -> Dict[str, Path]:
    """Every :data:`TEST_VARIANTS` checkpoint under ``root/<name>/``, random weights; returns the folders by name."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: spec.write(root / name, seed) for name, spec in TEST_VARIANTS.items()}
    (root / README_NAME).write_text(WARNING + "\n")
    return paths


def write_all(root: Path, seed: int = 0) -> Dict[str, Path]:
    """All three random checkpoints under ``root``; returns their paths by role."""
    root.mkdir(parents=True, exist_ok=True)
    encodec = write_random_encodec(root / RANDOM_ENCODEC_NAME, seed)
    paths = {
        Model.VOCOS_MEL: write_random_vocos_mel(root / "vocos-mel-24khz", seed),
        Model.VOCOS_ENCODEC: write_random_vocos_encodec(root / "vocos-encodec-24khz", encodec, seed),
        "encodec": encodec,
    }
    (root / README_NAME).write_text(WARNING + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="folder to write the random checkpoints into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", action="store_true", help="also write the test variants (TEST_VARIANTS)")
    args = parser.parse_args()
    paths: Dict[str, Path] = write_all(args.output, args.seed)
    if args.variants:
        paths.update(write_test_variants(args.output, args.seed))
    print(WARNING)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
