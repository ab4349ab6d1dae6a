"""Random-initialised checkpoints in exactly the upstream formats, for tests and the labelled demo.

No pretrained weights can be downloaded on an offline machine, so tests build the models from files
that look exactly like the real ones (same files, key names, shapes and dtypes) but hold random
weights. ``encodec``'s ``pretrained=False`` model has all-zero codebooks (its k-means init never ran),
which would make every code 0 and every EnCodec test pass trivially; here each codebook is seeded
from the random encoder's own residuals on a synthetic signal, as k-means init would do.

Command line: ``python -m vocos_triton.build.random_checkpoints OUT_DIR`` writes
``OUT_DIR/vocos-mel-24khz/``, ``OUT_DIR/vocos-encodec-24khz/`` and ``OUT_DIR/encodec_24khz-random.th``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict

import torch

from ..contract import Model
from .checkpoints import CONFIG_FILE, WEIGHTS_FILE

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


def write_random_vocos_encodec(directory: Path, encodec_path: Path, seed: int = 0) -> Path:
    """``config.yaml`` + ``pytorch_model.bin`` of a random EnCodec-variant Vocos whose
    ``feature_extractor.codebook_weights`` are the (random) EnCodec checkpoint's first 16 codebooks."""
    import yaml
    from vocos.pretrained import instantiate_class

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(ENCODEC_CONFIG)
    config = yaml.safe_load(ENCODEC_CONFIG)
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
    args = parser.parse_args()
    paths = write_all(args.output, args.seed)
    print(WARNING)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
