"""Vocos checkpoints of any geometry: the geometry is learnt from the checkpoint's config, the reference model
built from it makes as many frames and samples as :class:`~vocos_triton.contract.Geometry` says, and what
cannot be served is refused when the checkpoint is loaded, naming the config file and the field.

CPU only, no server. The checkpoints are written by ``vocos`` itself (``Vocos.from_hparams``), mostly with
small backbones (the geometry is what matters); one test loads the full-size test variants."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
import yaml

from vocos_triton.build import checkpoints as ck
from vocos_triton.build.random_checkpoints import (
    ENCODEC_CONFIG,
    TEST_VARIANTS,
    VariantSpec,
    to_transformers_flat,
    transformers_config,
    variant_config,
    write_random_vocos_variant,
    write_random_vocos_variant_transformers,
    write_test_variants,
)
from vocos_triton.contract import CENTER, ENCODEC_24KHZ, MEL, SAME, Geometry

SMALL = {"dim": 32, "intermediate_dim": 64, "num_layers": 2}  # a backbone that builds in milliseconds


@pytest.fixture(scope="module")
def small_variants(tmp_path_factory) -> Dict[str, Path]:
    """Every test variant's geometry and layout, with a small backbone."""
    root = tmp_path_factory.mktemp("small-variants")
    return {name: spec.write(root / name, seed=0, **SMALL) for name, spec in TEST_VARIANTS.items()}


# ---------------------------------------------------------------------------------------------------------
# Geometry: learnt from the checkpoint, and the reference's frame and sample counts follow it
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEST_VARIANTS))
def test_variant_loads_with_its_geometry(small_variants, name):
    spec = TEST_VARIANTS[name]
    checkpoint = ck.load_vocos_checkpoint(str(small_variants[name]), expected_variant=MEL)
    assert checkpoint.layout == spec.layout
    assert checkpoint.geometry == spec.geometry == ck.checkpoint_geometry(checkpoint)
    assert checkpoint.geometry == Geometry(MEL, spec.sample_rate, spec.n_mels, spec.hop_length, spec.n_fft,
                                           spec.padding)
    assert ck.backbone_shape(checkpoint) == SMALL


@pytest.mark.parametrize("name", sorted(TEST_VARIANTS))
def test_reference_lengths_follow_the_geometry(small_variants, name):
    checkpoint = ck.load_vocos_checkpoint(str(small_variants[name]))
    geometry = checkpoint.geometry
    model = ck.build_reference_vocos(checkpoint)
    for frames in (geometry.min_frames, geometry.min_frames + 1, 7, 40):
        mel = torch.randn(2, geometry.input_channels, frames)
        assert model.decode(mel).shape == (2, geometry.waveform_samples(frames)), frames
    hop, n_fft = geometry.hop_length, geometry.n_fft
    for samples in (geometry.min_samples, geometry.min_samples + 1, hop * 9, hop * 9 + 1, n_fft * 3 - 1, 12_345):
        with torch.inference_mode():
            mel = model.feature_extractor(torch.randn(1, samples))
        assert mel.shape == (1, geometry.input_channels, geometry.frames(samples)), samples
    with torch.inference_mode():  # audio to mel to audio: as many samples as the geometry says
        audio = model(torch.randn(1, hop * 20))
    assert audio.shape[-1] == geometry.waveform_samples(geometry.frames(hop * 20))


@pytest.mark.parametrize("padding", [CENTER, SAME])
@pytest.mark.parametrize("n_fft,hop", [(1024, 256), (2048, 512), (640, 160), (1280, 320), (2048, 256), (512, 256)])
def test_frames_and_min_samples_equal_the_reference_front_end(n_fft, hop, padding):
    """Geometry.frames and min_samples against vocos' MelSpectrogramFeatures, lengths around the minimum and on."""
    from vocos.feature_extractors import MelSpectrogramFeatures

    geometry = Geometry(MEL, 16_000, 40, hop, n_fft, padding)
    front_end = MelSpectrogramFeatures(sample_rate=16_000, n_fft=n_fft, hop_length=hop, n_mels=40, padding=padding)
    minimum = geometry.min_samples
    lengths = sorted({minimum, minimum + 1, minimum + 2, hop, hop + 1, 2 * hop - 1, 2 * hop, n_fft - 1, n_fft,
                      n_fft + 1, 5 * hop + 3, 8_000 + 7} - set(range(minimum)))
    for samples in lengths:
        with torch.inference_mode():
            frames = front_end(torch.zeros(1, samples) + 0.1).shape[-1]
        assert frames == geometry.frames(samples), (samples, frames)
        assert frames >= geometry.min_frames
    # one sample fewer than the minimum: the reference either cannot pad it or makes too few frames
    try:
        with torch.inference_mode():
            frames = front_end(torch.zeros(1, minimum - 1) + 0.1).shape[-1]
    except RuntimeError:
        return
    assert frames < geometry.min_frames


def test_transformers_variant_holds_the_same_weights_as_the_upstream_one(tmp_path):
    """Same seed, same model: the transformers writer's file reads back (hf_layout) into the upstream state."""
    spec = TEST_VARIANTS["tts-16k-hf"]
    upstream = write_random_vocos_variant(tmp_path / "upstream", seed=3, **spec.kwargs(**SMALL))
    port = write_random_vocos_variant_transformers(tmp_path / "port", seed=3, **spec.kwargs(**SMALL))
    a, b = ck.load_vocos_checkpoint(str(upstream)), ck.load_vocos_checkpoint(str(port))
    assert b.layout == ck.TRANSFORMERS and b.details["key_layout"] == "flat"
    assert b.config == a.config and b.geometry == a.geometry
    assert sorted(a.state_dict) == sorted(b.state_dict)
    for key, value in a.state_dict.items():
        assert torch.equal(b.state_dict[key], value), key
    written = json.loads((port / "config.json").read_text())
    assert written == transformers_config(**spec.kwargs(**SMALL)) and written["model_type"] == "vocos"
    weights = port / ("model.safetensors" if (port / "model.safetensors").is_file() else "pytorch_model.bin")
    assert b.sha256 == {"config.json": ck.sha256_of(port / "config.json"), weights.name: ck.sha256_of(weights)}


def test_variant_state_dict_is_the_reference_packages(small_variants):
    """The upstream writer's file is Vocos.from_hparams' state_dict: keys, shapes, the mel buffers' values."""
    from vocos import Vocos

    directory = small_variants["music-44k"]
    fresh = Vocos.from_hparams(str(directory / "config.yaml")).state_dict()
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in fresh.items()}
    for key in ("feature_extractor.mel_spec.spectrogram.window", "feature_extractor.mel_spec.mel_scale.fb",
                "head.istft.window"):
        assert torch.equal(state[key], fresh[key]), key
    assert state["feature_extractor.mel_spec.mel_scale.fb"].shape == (2048 // 2 + 1, 128)


def test_a_config_left_to_the_reference_defaults(tmp_path):
    """Fields left out take vocos' defaults, read from its classes (24 kHz, 100 mels, 1024 / 256, center)."""
    directory = write_random_vocos_variant(tmp_path / "v", sample_rate=24_000, n_mels=100, n_fft=1024, hop_length=256,
                                           padding="center", **SMALL)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["feature_extractor"]["init_args"] = {}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoint = ck.load_vocos_checkpoint(str(directory))
    assert checkpoint.geometry == Geometry(MEL, 24_000, 100, 256, 1024, CENTER)


def test_full_size_test_variants(tmp_path):
    """The variants the test-suite serves, at full size; the music model (dim 768, 12 layers) decodes."""
    paths = write_test_variants(tmp_path, seed=0)
    assert sorted(paths) == sorted(TEST_VARIANTS)
    for name, directory in paths.items():
        spec = TEST_VARIANTS[name]
        checkpoint = ck.load_vocos_checkpoint(str(directory))
        assert checkpoint.layout == spec.layout and checkpoint.geometry == spec.geometry, name
        assert ck.backbone_shape(checkpoint) == {"dim": spec.dim, "intermediate_dim": spec.intermediate_dim,
                                                 "num_layers": spec.num_layers}, name
    music = ck.load_vocos_checkpoint(str(paths["music-44k"]))
    model = ck.build_reference_vocos(music)
    assert sum(p.numel() for p in model.backbone.convnext.parameters()) > 40_000_000
    assert model.decode(torch.randn(1, 128, 5)).shape == (1, music.geometry.waveform_samples(5)) == (1, 5 * 512)


def test_default_checkpoints_keep_their_geometry(tmp_path):
    from vocos_triton.build.random_checkpoints import MEL_CONFIG
    from vocos_triton.contract import MEL_24KHZ

    for text, expected in ((MEL_CONFIG, MEL_24KHZ), (ENCODEC_CONFIG, ENCODEC_24KHZ)):
        directory = _config_only(tmp_path / expected.kind, yaml.safe_load(text))
        checkpoint = ck.load_vocos_checkpoint(str(directory))
        assert checkpoint.geometry == expected
    assert ck.backbone_shape(checkpoint) == {"dim": 384, "intermediate_dim": 1152, "num_layers": 8}


# ---------------------------------------------------------------------------------------------------------
# Refusals: at load time, naming the config file and the field
# ---------------------------------------------------------------------------------------------------------

def _config_only(directory: Path, config: dict) -> Path:
    """A config.yaml with an empty weights file: the config is checked before the weights are read."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    torch.save({}, directory / "pytorch_model.bin")
    return directory


def _edit(section: str, **changes) -> Callable[[dict], None]:
    """Set (or, with None, remove) ``init_args`` entries of ``section``."""
    def edit(config: dict) -> None:
        for key, value in changes.items():
            if value is None:
                config[section]["init_args"].pop(key, None)
            else:
                config[section]["init_args"][key] = value
    return edit


def _class(section: str, class_path: str) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config[section]["class_path"] = class_path
    return edit


def _refused(directory: Path, config_file: str) -> str:
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_vocos_checkpoint(str(directory))
    message = str(info.value)
    assert message.startswith(f"{directory / config_file}: "), message
    return message


MEL_REFUSALS = {
    "input-channels": (_edit("backbone", input_channels=100),
                       "backbone.init_args.input_channels is 100 but feature_extractor.init_args.n_mels is 80; the "
                       "backbone reads one input channel per mel bin"),
    "front-end-hop": (_edit("feature_extractor", hop_length=512),
                      "feature_extractor.init_args.hop_length is 512 but head.init_args.hop_length is 256; the served "
                      "mel front end and the vocoder must agree: a mel made at one hop and decoded at another is "
                      "wrong-rate audio"),
    "front-end-n-fft": (_edit("feature_extractor", n_fft=2048),
                        "feature_extractor.init_args.n_fft is 2048 but head.init_args.n_fft is 1024"),
    "front-end-padding": (_edit("feature_extractor", padding="same"),
                          "feature_extractor.init_args.padding is 'same' but head.init_args.padding is 'center'"),
    "paddings-left-out": (lambda c: (_edit("feature_extractor", padding=None)(c), _edit("head", padding=None)(c)),
                          "feature_extractor.init_args.padding is 'center' (left out: MelSpectrogramFeatures "
                          "default) but head.init_args.padding is 'same' (left out: ISTFTHead default)"),
    "hop-not-dividing": (_edit("head", n_fft=1000),
                         "head.init_args.hop_length is 256 but head.init_args.n_fft is 1000, not a multiple of it"),
    "hop-not-below-n-fft": (_edit("head", hop_length=1024),
                            "head.init_args.hop_length is 1024 but head.init_args.n_fft is 1024; expected "
                            "hop_length < n_fft"),
    "odd-n-fft": (_edit("head", n_fft=1023), "head.init_args.n_fft is 1023; expected an even n_fft"),
    "same-odd-trim": (_edit("head", n_fft=1032, hop_length=129, padding="same"),
                      "head.init_args.padding is 'same' with head.init_args.n_fft is 1032 and "
                      "head.init_args.hop_length is 129"),
    "win-length": (_edit("head", win_length=800),
                   "head.init_args.win_length is 800, but ISTFTHead has no win_length: its window is n_fft samples "
                   "long (win_length = n_fft)"),
    "front-end-win-length": (_edit("feature_extractor", win_length=1024),
                             "feature_extractor.init_args.win_length is 1024, but MelSpectrogramFeatures has no "
                             "win_length"),
    "unknown-argument": (_edit("backbone", kernel_size=5),
                         "backbone.init_args.kernel_size is not an argument of vocos.models.VocosBackbone"),
    "missing-argument": (_edit("head", n_fft=None), "head.init_args.n_fft is missing; vocos.heads.ISTFTHead "
                                                    "requires it"),
    "imdct-symexp": (_class("head", "vocos.heads.IMDCTSymExpHead"),
                     "head.class_path is 'vocos.heads.IMDCTSymExpHead': IMDCT heads are not served; "),
    "imdct-cos": (_class("head", "vocos.heads.IMDCTCosHead"),
                  "head.class_path is 'vocos.heads.IMDCTCosHead': IMDCT heads are not served; "),
    "unknown-head": (_class("head", "mypackage.heads.FancyHead"),
                     "head 'mypackage.heads.FancyHead' is not supported (head.class_path); expected "
                     "vocos.heads.ISTFTHead"),
    "resnet-backbone": (_class("backbone", "vocos.models.VocosResNetBackbone"),
                        "backbone.class_path is 'vocos.models.VocosResNetBackbone': VocosResNetBackbone is not "
                        "served"),
    "unknown-backbone": (_class("backbone", "vocos.models.Transformer"),
                         "backbone 'vocos.models.Transformer' is not supported (backbone.class_path)"),
    "padding-valid": (_edit("feature_extractor", padding="valid"),
                      "feature_extractor.init_args.padding is 'valid'; expected 'center' or 'same'"),
    "head-padding": (_edit("head", padding="reflect"),
                     "head.init_args.padding is 'reflect'; expected 'center' or 'same'"),
    "n-mels-zero": (_edit("feature_extractor", n_mels=0),
                    "feature_extractor.init_args.n_mels is 0; expected a positive whole number"),
    "n-mels-float": (lambda c: (_edit("feature_extractor", n_mels=80.0)(c), _edit("backbone", input_channels=80.0)(c)),
                     "backbone.init_args.input_channels is 80.0; expected a positive whole number"),
    "sample-rate-fraction": (_edit("feature_extractor", sample_rate=22050.5),
                             "feature_extractor.init_args.sample_rate is 22050.5; expected a positive whole number"),
    "sample-rate-text": (_edit("feature_extractor", sample_rate="22k"),
                         "feature_extractor.init_args.sample_rate is '22k'; expected a positive whole number"),
    "sample-rate-negative": (_edit("feature_extractor", sample_rate=-22050),
                             "feature_extractor.init_args.sample_rate is -22050"),
    "no-layers": (_edit("backbone", num_layers=0), "backbone.init_args.num_layers is 0; expected at least 1"),
    "dim-negative": (lambda c: (_edit("backbone", dim=-32)(c), _edit("head", dim=-32)(c)),
                     "backbone.init_args.dim is -32; expected a positive whole number"),
    "intermediate-zero": (_edit("backbone", intermediate_dim=0),
                          "backbone.init_args.intermediate_dim is 0; expected a positive whole number"),
    "head-dim": (_edit("head", dim=64), "head.init_args.dim is 64 but backbone.init_args.dim is 32"),
    "mel-adanorm": (_edit("backbone", adanorm_num_embeddings=4),
                    "backbone.init_args.adanorm_num_embeddings is 4, but a mel Vocos has no bandwidth to condition "
                    "on"),
}


@pytest.fixture(scope="module")
def small_mel_config(small_variants) -> dict:
    return yaml.safe_load((small_variants["matcha-22k"] / "config.yaml").read_text())


@pytest.mark.parametrize("case", sorted(MEL_REFUSALS))
def test_mel_config_refusals_name_the_file_and_the_field(small_variants, small_mel_config, tmp_path, case):
    edit, expected = MEL_REFUSALS[case]
    directory = tmp_path / "checkpoint"
    shutil.copytree(small_variants["matcha-22k"], directory)
    config = json.loads(json.dumps(small_mel_config))
    edit(config)
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    message = _refused(directory, "config.yaml")
    assert expected in message, message


ENCODEC_REFUSALS = {
    "encodec-48khz": (_edit("feature_extractor", encodec_model="encodec_48khz"),
                      "feature_extractor.init_args.encodec_model is 'encodec_48khz'; expected 'encodec_24khz' (the "
                      "EnCodec that the encodec_encoder model serves; 48 kHz EnCodec is not served)"),
    "bandwidths-short": (_edit("feature_extractor", bandwidths=[1.5, 3.0, 6.0]),
                         "feature_extractor.init_args.bandwidths is [1.5, 3.0, 6.0]; expected exactly "
                         "[1.5, 3.0, 6.0, 12.0]"),
    "bandwidths-order": (_edit("feature_extractor", bandwidths=[3.0, 1.5, 6.0, 12.0]),
                         "feature_extractor.init_args.bandwidths is [3.0, 1.5, 6.0, 12.0]; expected exactly"),
    "bandwidths-24": (_edit("feature_extractor", bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0]),
                      "feature_extractor.init_args.bandwidths is [1.5, 3.0, 6.0, 12.0, 24.0]"),
    "hop": (_edit("head", hop_length=256), "head.init_args.hop_length is 256; expected 320: EnCodec 24 kHz makes "
                                           "one frame per 320 samples"),
    "input-channels": (_edit("backbone", input_channels=100),
                       "backbone.init_args.input_channels is 100; expected 128"),
    "adanorm": (_edit("backbone", adanorm_num_embeddings=2),
                "backbone.init_args.adanorm_num_embeddings is 2; expected 4, one adaptive-norm embedding per "
                "bandwidth of feature_extractor.init_args.bandwidths"),
    "adanorm-left-out": (_edit("backbone", adanorm_num_embeddings=None),
                         "backbone.init_args.adanorm_num_embeddings is None (left out: VocosBackbone default); "
                         "expected 4"),
    "imdct": (_class("head", "vocos.heads.IMDCTSymExpHead"), "IMDCT heads are not served"),
    "no-layers": (_edit("backbone", num_layers=-1), "backbone.init_args.num_layers is -1; expected at least 1"),
}


@pytest.mark.parametrize("case", sorted(ENCODEC_REFUSALS))
def test_encodec_config_refusals_name_the_file_and_the_field(tmp_path, case):
    edit, expected = ENCODEC_REFUSALS[case]
    config = yaml.safe_load(ENCODEC_CONFIG)
    edit(config)
    message = _refused(_config_only(tmp_path / "checkpoint", config), "config.yaml")
    assert expected in message, message


def test_encodec_bandwidths_may_be_left_out_or_written_as_ints(tmp_path):
    for name, bandwidths in (("left-out", None), ("ints", [1.5, 3, 6, 12])):
        config = yaml.safe_load(ENCODEC_CONFIG)
        _edit("feature_extractor", bandwidths=bandwidths)(config)
        checkpoint = ck.load_vocos_checkpoint(str(_config_only(tmp_path / name, config)))
        assert checkpoint.geometry == ENCODEC_24KHZ


HF_REFUSALS = {  # config.json edits of the tts-16k-hf variant (n_fft 640, hop 160) and the field each names
    "hop-not-dividing": ({"hop_length": 300}, "hop_length is 300 but n_fft is 640, not a multiple of it"),
    "hop-not-below-n-fft": ({"hop_length": 640}, "hop_length is 640 but n_fft is 640; expected hop_length < n_fft"),
    "padding": ({"istft_padding": "valid"}, "istft_padding is 'valid'; expected 'center' or 'same'"),
    "n-mels": ({"n_mels": 0}, "n_mels is 0; expected a positive whole number"),
    "sample-rate": ({"sample_rate": "16k"}, "sample_rate is '16k'; expected a positive whole number"),
    "no-layers": ({"num_layers": 0}, "num_layers is 0; expected at least 1"),
    "hidden-size": ({"hidden_size": -8}, "hidden_size is -8; expected a positive whole number"),
    "intermediate-size": ({"intermediate_size": 0}, "intermediate_size is 0; expected a positive whole number"),
    "odd-n-fft": ({"n_fft": 641, "hop_length": 641}, "n_fft is 641; expected an even n_fft"),
}


@pytest.mark.parametrize("case", sorted(HF_REFUSALS))
def test_transformers_config_refusals_name_config_json_and_its_field(small_variants, tmp_path, case):
    changes, expected = HF_REFUSALS[case]
    directory = tmp_path / "checkpoint"
    shutil.copytree(small_variants["tts-16k-hf"], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    message = _refused(directory, "config.json")
    assert expected in message, message
    assert "init_args" not in message  # the transformers names, not the upstream ones


@pytest.mark.parametrize("replace,by,expected", [
    ("n_mels", {"input_channels": 0}, "input_channels is 0; expected a positive whole number"),
    ("istft_padding", {"spec_padding": "valid"}, "spec_padding is 'valid'; expected 'center' or 'same'"),
    ("sample_rate", {"sampling_rate": 0}, "sampling_rate is 0; expected a positive whole number"),
], ids=["input_channels", "spec_padding", "sampling_rate"])
def test_transformers_message_uses_the_name_the_file_uses(small_variants, tmp_path, replace, by, expected):
    """The port's revisions named some fields differently; the message names the one in the file."""
    directory = tmp_path / "checkpoint"
    shutil.copytree(small_variants["tts-16k-hf"], directory)
    config = json.loads((directory / "config.json").read_text())
    del config[replace]
    (directory / "config.json").write_text(json.dumps({**config, **by}))
    message = _refused(directory, "config.json")
    assert expected in message, message


ENCODEC_HF = {"model_type": "vocos_encodec", "codebook_dim": 128, "hidden_size": 384, "intermediate_size": 1152,
              "num_layers": 8, "n_fft": 1280, "hop_length": 320, "istft_padding": "same", "sample_rate": 24000,
              "bandwidths": [1.5, 3.0, 6.0, 12.0]}


@pytest.mark.parametrize("changes,expected", [
    ({"hop_length": 256}, "hop_length is 256; expected 320"),
    ({"codebook_dim": 100}, "codebook_dim is 100; expected 128"),
    ({"bandwidths": [1.5, 3.0, 6.0]}, "bandwidths=[1.5, 3.0, 6.0]; expected [1.5, 3.0, 6.0, 12.0]"),
], ids=["hop", "codebook-dim", "bandwidths"])
def test_transformers_encodec_refusals(tmp_path, changes, expected):
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**ENCODEC_HF, **changes}))
    (directory / "model.safetensors").write_bytes(b"")  # the config is refused before the weights are read
    message = _refused(directory, "config.json")
    assert expected in message, message


# ---------------------------------------------------------------------------------------------------------
# Weights that do not fit the config: refused naming both files
# ---------------------------------------------------------------------------------------------------------

def test_truncated_variant_weights(small_variants, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(small_variants["music-44k"], directory)
    weights = directory / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="not a readable PyTorch checkpoint") as info:
        ck.load_vocos_checkpoint(str(directory))
    assert str(info.value).startswith(f"{weights}: ")


@pytest.mark.parametrize("problem", ["shape", "missing", "unexpected"])
def test_weights_that_do_not_fit_the_config_name_both_files(small_variants, tmp_path, problem):
    directory = tmp_path / "checkpoint"
    shutil.copytree(small_variants["matcha-22k"], directory)
    weights, config_path = directory / "pytorch_model.bin", directory / "config.yaml"
    if problem == "shape":  # a config for a wider backbone than the weights hold
        config = yaml.safe_load(config_path.read_text())
        _edit("backbone", dim=64)(config)
        _edit("head", dim=64)(config)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        expected = "shape mismatch: 'backbone.embed.weight' is (32, 80, 7) in the weights, (64, 80, 7) for the config"
    else:
        state = torch.load(weights, weights_only=True)
        if problem == "missing":
            del state["backbone.convnext.1.gamma"]
            expected = "missing key(s) 'backbone.convnext.1.gamma'"
        else:
            state["backbone.convnext.2.gamma"] = state["backbone.convnext.1.gamma"]
            expected = "unexpected key(s) 'backbone.convnext.2.gamma'"
        torch.save(state, weights)
    checkpoint = ck.load_vocos_checkpoint(str(directory))
    with pytest.raises(ck.CheckpointError) as info:
        ck.build_reference_vocos(checkpoint)
    message = str(info.value)
    assert message.startswith(f"{weights}: does not match {config_path}: "), message
    assert expected in message, message


def test_weights_of_another_geometry_are_refused(small_variants, tmp_path):
    """music-44k's weights (128 mels, n_fft 2048) under matcha-22k's config (80 mels, n_fft 1024)."""
    directory = tmp_path / "checkpoint"
    shutil.copytree(small_variants["matcha-22k"], directory)
    shutil.copy(small_variants["music-44k"] / "pytorch_model.bin", directory / "pytorch_model.bin")
    checkpoint = ck.load_vocos_checkpoint(str(directory))
    with pytest.raises(ck.CheckpointError) as info:
        ck.build_reference_vocos(checkpoint)
    message = str(info.value)
    assert message.startswith(f"{directory / 'pytorch_model.bin'}: does not match {directory / 'config.yaml'}")
    assert "'backbone.embed.weight' is (32, 128, 7) in the weights, (32, 80, 7) for the config" in message


def test_transformers_weights_that_do_not_fit_config_json(small_variants, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(small_variants["tts-16k-hf"], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_mels": 100}))
    weights = next(p for p in directory.iterdir() if p.name in ("model.safetensors", "pytorch_model.bin"))
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_vocos_checkpoint(str(directory))
    message = str(info.value)
    assert message.startswith(f"{weights}: ") and "(from config.json" in message, message
    assert "key 'embed.weight' has shape (32, 80, 7), expected (32, 100, 7)" in message


def test_flat_conversion_round_trips_every_key():
    from vocos_triton.build import hf_layout

    spec: VariantSpec = TEST_VARIANTS["music-44k"]
    config = variant_config(**spec.kwargs(**SMALL))
    state = hf_layout.expected_state(config, MEL)
    flat = to_transformers_flat(state)
    assert not any(k.startswith("feature_extractor.") for k in flat)
    renamed, _ = hf_layout.to_upstream_keys(flat, hf_layout.KEY_LAYOUTS[0], adaptive=False, path=Path("x"))
    assert sorted(renamed) == sorted(k for k in state if not k.startswith("feature_extractor."))
