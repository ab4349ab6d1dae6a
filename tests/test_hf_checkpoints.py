"""The transformers layout of Vocos checkpoints: written from the upstream fixtures with the port's own
conversion (re-implemented here, independent of the loader's inverse mapping), loaded, exported and served
exactly like the upstream layout; corrupted checkpoints fail with the file, the key and the expectation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, Iterator
from unittest import mock

import numpy as np
import pytest
import torch

from vocos_triton.build import checkpoints as ck
from vocos_triton.build import export
from vocos_triton.build.export import ARTIFACT, PROVENANCE, build_repository, pad_batch
from vocos_triton.contract import BANDWIDTHS, CODEBOOKS, Model
from vocos_triton.launcher.server import ServerOptions, TritonServer, free_port
from vocos_triton.serving import kernels
from vocos_triton.serving.codebooks import TABLE_FILE
from vocos_triton.speech import speech_clip

import reference_outputs as ref
from triton_helpers import bandwidth_tensor, infer

State = Dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------------
# The port's forward conversion (upstream vocos -> transformers), as its scripts do it.
# ---------------------------------------------------------------------------------------------------------


def convert_mel_flat(original: State) -> State:
    """transformers src/transformers/models/vocos/convert_vocos_weights_to_hf.py @ 5a864366d10c."""
    converted = {}
    for key, value in original.items():
        if key.startswith("feature_extractor."):
            continue
        key = key.replace("backbone.embed.", "embed.")
        key = key.replace("backbone.norm.", "norm.")
        key = key.replace("backbone.convnext.", "layers.")
        key = key.replace("backbone.final_layer_norm.", "final_layer_norm.")
        key = key.replace(".gamma", ".layer_scale_parameter")
        key = key.replace("head.", "decoder.")
        if "istft.window" in key:
            key = key.replace("istft.window", "window")
        converted[key] = value
    return converted


def convert_encodec_flat(original: State) -> State:
    """transformers src/transformers/models/vocos_encodec/convert_vocos_with_encodec.py @ 5a864366d10c."""
    converted = {}
    for old_key, value in original.items():
        if old_key == "feature_extractor.codebook_weights":
            converted["codebook_weights"] = value
        elif old_key.startswith("backbone.") or old_key in ["norm.scale.weight", "norm.shift.weight"]:
            new_key = old_key.replace("backbone.embed.", "embed.")
            new_key = new_key.replace("backbone.norm.", "norm.")
            new_key = new_key.replace("backbone.convnext.", "layers.")
            new_key = new_key.replace("backbone.final_layer_norm.", "final_layer_norm.")
            new_key = new_key.replace(".gamma", ".layer_scale_parameter")
            new_key = new_key.replace(".norm.scale.weight", ".norm.weight")
            new_key = new_key.replace(".norm.shift.weight", ".norm.bias")
            if new_key == "norm.scale.weight":
                new_key = "norm.weight"
            elif new_key == "norm.shift.weight":
                new_key = "norm.bias"
            converted[new_key] = value
        elif old_key.startswith("head."):
            new_key = old_key.replace("head.", "decoder.")
            if "istft.window" in new_key:
                new_key = new_key.replace("istft.window", "window")
            converted[new_key] = value
    return converted


def convert_mel_nested(original: State) -> State:
    """transformers src/transformers/models/vocos/convert_vocos_weights_to_hf.py @ 4583150de4f6."""
    converted = {}
    for key, value in original.items():
        if key.startswith("feature_extractor."):
            continue
        if key == "head.istft.window":
            key = "head.window"
        key = key.replace("head.out.", "head.out_proj.")
        key = key.replace("backbone.convnext.", "backbone.layers.")
        key = key.replace(".gamma", ".layer_scale_parameter")
        converted[key] = value
    return converted


_BACKBONE_MAPPING = {  # c15786d960d8's BACKBONE_MAPPING / HEAD_MAPPING and _remap_key, in their order
    ".gamma": ".layer_scale_parameter",
    ".norm.scale.weight": ".norm.weight",
    ".norm.shift.weight": ".norm.bias",
    "backbone.norm.scale.weight": "backbone.norm.weight",
    "backbone.norm.shift.weight": "backbone.norm.bias",
    "backbone.convnext.*": "backbone.layers.*",
}
_HEAD_MAPPING = {"head.out.weight": "head.out_proj.weight", "head.out.bias": "head.out_proj.bias"}


def _remap_key(key: str, mapping: Dict[str, str]) -> str:
    while True:
        new_key = key
        for old, new in mapping.items():
            if "*" in old:
                prefix, suffix = old.split("*")
                if new_key.startswith(prefix) and new_key.endswith(suffix):
                    idx = new_key[len(prefix):] if not suffix else new_key[len(prefix): -len(suffix)]
                    new_key = new.replace("*", idx)
                    break
            elif old in new_key:
                new_key = new_key.replace(old, new)
                break
        if new_key == key:
            return new_key
        key = new_key


def convert_encodec_nested(original: State) -> State:
    """transformers src/transformers/models/vocos/convert_vocos_with_encodec.py @ c15786d960d8 (the EnCodec
    variant as a VocosModel with adaptive norms; its codebooks came from the processor's EnCodec)."""
    converted = {}
    for old_key, value in original.items():
        if old_key.startswith("backbone."):
            converted[_remap_key(old_key, _BACKBONE_MAPPING)] = value
        elif old_key.startswith("head.out."):
            converted[_remap_key(old_key, _HEAD_MAPPING)] = value
        elif old_key == "head.istft.window":
            converted["head.window"] = value
    return converted


# config.json as each revision's config class writes it (configuration_vocos.py @ fe434ab35c4a,
# configuration_vocos_encodec.py @ c814c68c1c81, configuration_vocos.py @ 037a67e1a3a8, and the c15786d9
# script's VocosConfig(input_channels=128, hidden_dim=384, intermediate_dim=1152, n_fft=1280, hop_length=320,
# spec_padding="same", use_adaptive_norm=True)).
CONFIGS = {
    ("flat", "mel"): {"model_type": "vocos", "architectures": ["VocosModel"], "n_mels": 100, "hidden_size": 512,
                      "intermediate_size": 1536, "num_layers": 8, "kernel_size": 7, "padding": 3,
                      "layer_scale_init_value": 0.125, "layer_norm_eps": 1e-6, "n_fft": 1024, "hop_length": 256,
                      "istft_padding": "center", "sample_rate": 24000, "hidden_act": "gelu"},
    ("flat", "encodec"): {"model_type": "vocos_encodec", "architectures": ["VocosEncodecModel"],
                          "codebook_dim": 128, "num_quantizers": 16384, "hidden_size": 384,
                          "intermediate_size": 1152, "num_layers": 8, "kernel_size": 7, "padding": 3,
                          "layer_scale_init_value": 0.125, "layer_norm_eps": 1e-6, "n_fft": 1280, "hop_length": 320,
                          "istft_padding": "same", "sample_rate": 24000, "hidden_act": "gelu",
                          "bandwidths": [1.5, 3.0, 6.0, 12.0]},
    ("nested", "mel"): {"model_type": "vocos", "architectures": ["VocosModel"], "input_channels": 100,
                        "hidden_size": 512, "intermediate_size": 1536, "num_layers": 8, "kernel_size": 7,
                        "padding": 3, "layer_scale_init_value": 0.125, "use_adaptive_norm": False,
                        "layer_norm_eps": 1e-6, "n_fft": 1024, "hop_length": 256, "istft_padding": "center",
                        "bandwidths": [1.5, 3.0, 6.0, 12.0], "sampling_rate": 24000},
    ("nested", "encodec"): {"model_type": "vocos", "architectures": ["VocosModel"], "input_channels": 128,
                            "hidden_dim": 384, "intermediate_dim": 1152, "num_layers": 8, "kernel_size": 7,
                            "padding": 3, "use_adaptive_norm": True, "layer_norm_eps": 1e-6, "n_fft": 1280,
                            "hop_length": 320, "spec_padding": "same"},
}
CONVERTERS: Dict[tuple, Callable[[State], State]] = {
    ("flat", "mel"): convert_mel_flat, ("flat", "encodec"): convert_encodec_flat,
    ("nested", "mel"): convert_mel_nested, ("nested", "encodec"): convert_encodec_nested,
}
FIXTURE = {"mel": Model.VOCOS_MEL, "encodec": Model.VOCOS_ENCODEC}


def write_transformers_layout(upstream_dir: Path, target: Path, key_layout: str, variant: str, fmt: str) -> Path:
    """What ``model.save_pretrained`` leaves: config.json + model.safetensors (or pytorch_model.bin)."""
    original = torch.load(upstream_dir / ck.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    converted = CONVERTERS[key_layout, variant](original)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps({**CONFIGS[key_layout, variant],
                                                    "transformers_version": "4.57.0.dev0"}, indent=2))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in converted.items()}, str(target / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        torch.save(converted, target / "pytorch_model.bin")
    return target


@pytest.fixture(scope="module")
def hf_dirs(checkpoint_paths, tmp_path_factory) -> Dict[tuple, Path]:
    """Every (key layout, variant, file format) written from the upstream random fixtures."""
    root = tmp_path_factory.mktemp("transformers-layout")
    return {(layout, variant, fmt): write_transformers_layout(checkpoint_paths[FIXTURE[variant]],
                                                              root / f"{layout}-{variant}-{fmt}", layout, variant, fmt)
            for layout in ("flat", "nested") for variant in ("mel", "encodec")
            for fmt in ("safetensors", "bin")}


# ---------------------------------------------------------------------------------------------------------
# Loading: same VocosCheckpoint as the upstream layout
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("key_layout", ["flat", "nested"])
@pytest.mark.parametrize("variant", ["mel", "encodec"])
def test_transformers_layout_loads_into_the_upstream_checkpoint(hf_dirs, mel_checkpoint, encodec_vocos_checkpoint,
                                                                key_layout, variant, fmt):
    directory = hf_dirs[key_layout, variant, fmt]
    upstream = mel_checkpoint if variant == "mel" else encodec_vocos_checkpoint
    loaded = ck.load_vocos_checkpoint(str(directory), expected_variant=variant)
    assert loaded.layout == ck.TRANSFORMERS and loaded.variant == variant
    assert loaded.config == upstream.config  # config.json maps to the hub's config.yaml, section for section
    expected = dict(upstream.state_dict)
    if key_layout == "nested" and variant == "encodec":  # that layout carries no codebooks
        assert loaded.codebooks_from_encodec
        assert loaded.details["codebook_weights"].startswith("from the EnCodec checkpoint")
        del expected["feature_extractor.codebook_weights"]
    assert sorted(loaded.state_dict) == sorted(expected)
    for key, value in expected.items():
        assert loaded.state_dict[key].dtype == value.dtype and torch.equal(loaded.state_dict[key], value), key
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    assert loaded.sha256 == {"config.json": ck.sha256_of(directory / "config.json"),
                             weights: ck.sha256_of(directory / weights)}
    described = ck.describe_sources(loaded)[f"vocos_{variant}"]
    assert described["layout"] == "transformers" and described["files"] == sorted(["config.json", weights])
    assert described["transformers"]["key_layout"] == key_layout


def test_upstream_layout_is_still_detected_as_upstream(mel_checkpoint):
    assert mel_checkpoint.layout == ck.UPSTREAM
    assert ck.describe_sources(mel_checkpoint)["vocos_mel"]["layout"] == "upstream"


# ---------------------------------------------------------------------------------------------------------
# Export: the artifacts are the same, bit for bit, and equal to the reference vocos
# ---------------------------------------------------------------------------------------------------------

HF_REPOS = {"flat-safetensors": ("flat", "safetensors"), "nested-bin": ("nested", "bin")}


@pytest.fixture(scope="module")
def hf_repositories(hf_dirs, encodec_checkpoint, tmp_path_factory) -> Dict[str, Path]:
    built = {}
    for name, (key_layout, fmt) in HF_REPOS.items():
        mel = ck.load_vocos_checkpoint(str(hf_dirs[key_layout, "mel", fmt]), "mel")
        vocos_encodec = ck.load_vocos_checkpoint(str(hf_dirs[key_layout, "encodec", fmt]), "encodec")
        output = tmp_path_factory.mktemp(f"repository-{name}")
        build_repository(output, mel, vocos_encodec, encodec_checkpoint, random_weights=True)
        built[name] = output
    return built


@pytest.fixture(scope="module")
def probe_inputs(reference_mel, reference_encodec) -> Dict[str, tuple]:
    """One ragged batch per model (odd lengths, every bandwidth but one) and the reference's own features."""
    clips = [speech_clip(n, seed=30 + i) for i, n in enumerate([2_000, 9_001, 4_097])]
    audio = pad_batch([torch.from_numpy(c) for c in clips])
    lengths = torch.tensor([c.shape[0] for c in clips])
    mels = [torch.from_numpy(ref.mel_features(reference_mel, c)) for c in clips]
    frames = torch.tensor([m.shape[-1] for m in mels])
    bandwidth_ids = torch.arange(len(clips)) % len(BANDWIDTHS)
    codes = [torch.from_numpy(ref.encodec_codes(reference_encodec, c, BANDWIDTHS[int(b)]))
             for c, b in zip(clips, bandwidth_ids)]
    feats = [torch.from_numpy(ref.codes_to_features(reference_encodec, c.numpy())) for c in codes]
    return {
        Model.MEL_FEATURES: (audio, lengths),
        Model.VOCOS_MEL: (pad_batch(mels), frames, torch.zeros_like(frames)),
        Model.ENCODEC_ENCODER: (audio, lengths, torch.tensor([CODEBOOKS[int(b)] for b in bandwidth_ids])),
        Model.VOCOS_ENCODEC: (pad_batch(feats), torch.tensor([f.shape[-1] for f in feats]), bandwidth_ids),
        "codes": codes, "mels": mels, "features": feats, "bandwidth_ids": bandwidth_ids,
    }


@pytest.mark.parametrize("name", sorted(HF_REPOS))
def test_artifacts_from_either_layout_are_identical(repository, hf_repositories, reference_mel, reference_encodec,
                                                    probe_inputs, name):
    built, inputs = hf_repositories[name], probe_inputs
    for model in (Model.MEL_FEATURES, Model.VOCOS_MEL, Model.ENCODEC_ENCODER, Model.VOCOS_ENCODEC):
        upstream = torch.jit.load(str(repository / model / "1" / ARTIFACT))
        transformers = torch.jit.load(str(built / model / "1" / ARTIFACT))
        with torch.inference_mode():
            a, b = upstream(*inputs[model]), transformers(*inputs[model])
        assert a.shape == b.shape and torch.equal(a, b), f"{model}: outputs differ between layouts"
    a = np.load(repository / Model.ENCODEC_EMBEDDING / "1" / TABLE_FILE, allow_pickle=False)
    b = np.load(built / Model.ENCODEC_EMBEDDING / "1" / TABLE_FILE, allow_pickle=False)
    assert np.array_equal(a, b)

    # and equal to the reference vocos decode built from the upstream files (independent of the mapping)
    vocoder = torch.jit.load(str(built / Model.VOCOS_MEL / "1" / ARTIFACT))
    with torch.inference_mode():
        waves = vocoder(*inputs[Model.VOCOS_MEL])
    for i, mel in enumerate(inputs["mels"]):
        expected = ref.mel_decode(reference_mel, mel.numpy())
        assert ref.max_error(waves[i, : expected.shape[0]].numpy(), expected) <= export.REFERENCE_TOLERANCE
    vocoder = torch.jit.load(str(built / Model.VOCOS_ENCODEC / "1" / ARTIFACT))
    with torch.inference_mode():
        waves = vocoder(*inputs[Model.VOCOS_ENCODEC])
    for i, feats in enumerate(inputs["features"]):
        expected = ref.encodec_decode(reference_encodec, feats.numpy(), BANDWIDTHS[int(inputs["bandwidth_ids"][i])])
        assert ref.max_error(waves[i, : expected.shape[0]].numpy(), expected) <= export.REFERENCE_TOLERANCE


def test_provenance_records_the_transformers_layout(hf_repositories, hf_dirs):
    provenance = json.loads((hf_repositories["flat-safetensors"] / Model.VOCOS_MEL / "1" / PROVENANCE).read_text())
    source = provenance["sources"]["vocos_mel"]
    directory = hf_dirs["flat", "mel", "safetensors"]
    assert source["layout"] == "transformers" and source["directory"] == str(directory)
    assert source["sha256"] == {"config.json": ck.sha256_of(directory / "config.json"),
                                "model.safetensors": ck.sha256_of(directory / "model.safetensors")}
    assert source["transformers"]["key_layout"] == "flat" and "5a864366" in source["transformers"]["port_commits"]
    nested = json.loads((hf_repositories["nested-bin"] / Model.VOCOS_ENCODEC / "1" / PROVENANCE).read_text())
    assert nested["sources"]["vocos_encodec"]["transformers"]["codebook_weights"].startswith("from the EnCodec")
    assert nested["sources"]["vocos_encodec"]["files"] == ["config.json", "pytorch_model.bin"]


# ---------------------------------------------------------------------------------------------------------
# Serving: a real tritonserver on a transformers-layout repository answers exactly like the upstream one
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_triton(triton, hf_repositories, tmp_path_factory) -> Iterator[TritonServer]:
    """A server on the transformers-layout repository whose vocoders run the Linear kernels the session's
    server chose (each server measures its own, and the two kernels differ in the last bits)."""
    build = tmp_path_factory.mktemp("triton-build-hf")
    options = ServerOptions(model_repository=hf_repositories["flat-safetensors"], grpc_port=free_port(),
                            http_port=free_port(), metrics_port=free_port(), build_dir=build, exit_timeout_s=10)
    server = TritonServer(options, log_file=build / "tritonserver.log")
    chosen = kernels.parse_log(triton.log_file.read_text())
    forced = ",".join(f"{model}={choice.kernel}" for model, choice in sorted(chosen.items()))
    with mock.patch.dict(os.environ, {kernels.KERNEL_ENV: forced}):
        server.start()
    yield server
    server.stop()


def test_served_audio_is_identical_between_layouts(triton, hf_triton, reference_mel, reference_encodec):
    import tritonclient.grpc as grpcclient

    mel = ref.mel_features(reference_mel, speech_clip(30_017, seed=5))
    codes = np.random.default_rng(3).integers(0, 1024, size=(8, 150), dtype=np.int64)  # Bark-like, 6 kbps
    with grpcclient.InferenceServerClient(triton.grpc_url) as upstream, \
            grpcclient.InferenceServerClient(hf_triton.grpc_url) as transformers:
        a = infer(upstream, Model.VOCOS_MEL, mel=mel)  # one request at a time: a batch of one on both
        b = infer(transformers, Model.VOCOS_MEL, mel=mel)
        assert a.shape == b.shape and np.array_equal(a, b)
        assert ref.max_error(b, ref.mel_decode(reference_mel, mel)) <= export.REFERENCE_TOLERANCE
        a = infer(upstream, Model.DECODE_CODES, codes=codes, bandwidth=bandwidth_tensor(6.0))
        b = infer(transformers, Model.DECODE_CODES, codes=codes, bandwidth=bandwidth_tensor(6.0))
        assert a.shape == b.shape and np.array_equal(a, b)
        assert ref.max_error(b, ref.decode_codes(reference_encodec, codes, 6.0)) <= export.REFERENCE_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# Corrupted checkpoints: file, key and expectation in the message; a failed build leaves the output alone
# ---------------------------------------------------------------------------------------------------------

def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def _rewrite_safetensors(path: Path, edit: Callable[[State], State]) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in edit(load_file(str(path))).items()}, str(path))


def test_renamed_key(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["flat", "mel", "safetensors"], tmp_path)
    weights = directory / "model.safetensors"
    _rewrite_safetensors(weights, lambda s: {("layers.3.pwconv_1.weight" if k == "layers.3.pwconv1.weight" else k): v
                                             for k, v in s.items()})
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_vocos_checkpoint(str(directory))
    message = str(info.value)
    assert str(weights) in message and "unexpected key 'layers.3.pwconv_1.weight'" in message
    assert "flat layout" in message


def test_missing_key(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["nested", "encodec", "bin"], tmp_path)
    weights = directory / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    del state["backbone.layers.5.norm.bias"]
    torch.save(state, weights)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_vocos_checkpoint(str(directory))
    message = str(info.value)
    assert str(weights) in message and "missing key 'backbone.layers.5.norm.bias'" in message
    assert "backbone.convnext.5.norm.shift.weight" in message and "expected shape (4, 384)" in message


def test_wrong_shape(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["flat", "encodec", "safetensors"], tmp_path)
    weights = directory / "model.safetensors"
    _rewrite_safetensors(weights, lambda s: {**s, "codebook_weights": s["codebook_weights"][:8 * 1024]})
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_vocos_checkpoint(str(directory))
    message = str(info.value)
    assert str(weights) in message and "key 'codebook_weights' has shape (8192, 128), expected (16384, 128)" in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(hf_dirs, tmp_path, fmt):
    directory = _copy(hf_dirs["flat", "mel", fmt], tmp_path)
    weights = directory / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    weights.write_bytes(weights.read_bytes()[: 1 << 20])  # an interrupted download
    expected = "not a readable safetensors file" if fmt == "safetensors" else "not a readable PyTorch checkpoint"
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_vocos_checkpoint(str(directory))
    assert str(weights) in str(info.value) and expected in str(info.value)


def test_unknown_layouts(hf_dirs, tmp_path):
    empty = tmp_path / "downloads"
    empty.mkdir()
    (empty / "weights.pt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"downloads: unknown checkpoint layout \(found \['weights.pt'\]\); "
                                                 r"expected config.yaml \+ pytorch_model.bin"):
        ck.load_vocos_checkpoint(str(empty))

    both = _copy(hf_dirs["flat", "mel", "safetensors"], tmp_path / "both")
    (both / "config.yaml").write_text("feature_extractor: {}\n")
    with pytest.raises(ck.CheckpointError, match=r"holds both config.yaml \(upstream vocos layout\) and config.json"):
        ck.load_vocos_checkpoint(str(both))

    other = _copy(hf_dirs["flat", "mel", "safetensors"], tmp_path)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "encodec"}))
    with pytest.raises(ck.CheckpointError, match=r"config.json: model_type 'encodec' is not a transformers Vocos "
                                                 r"config; expected 'vocos' or 'vocos_encodec'"):
        ck.load_vocos_checkpoint(str(other))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps(CONFIGS["flat", "mel"]))
    from safetensors.torch import save_file

    save_file({"generator.conv_pre.weight": torch.zeros(2, 2)}, str(foreign / "model.safetensors"))
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors: unknown key layout: neither 'decoder.out.weight'"
                                                 r" \(flat layout\) nor 'head.out_proj.weight' \(nested layout\)"):
        ck.load_vocos_checkpoint(str(foreign))


def test_config_that_upstream_cannot_build_is_refused(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["flat", "mel", "bin"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "kernel_size": 5}))
    with pytest.raises(ck.CheckpointError, match="kernel_size=5, but upstream vocos .* fixes kernel_size=7"):
        ck.load_vocos_checkpoint(str(directory))


def test_config_json_with_a_value_upstream_cannot_use(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["flat", "mel", "safetensors"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_layers": "eight"}))
    with pytest.raises(ck.CheckpointError, match=r"config.json: num_layers is 'eight'; expected at least 1"):
        ck.load_vocos_checkpoint(str(directory))


def test_config_json_that_disagrees_with_the_weights(hf_dirs, tmp_path):
    directory = _copy(hf_dirs["flat", "mel", "safetensors"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": 256}))
    with pytest.raises(ck.CheckpointError, match=r"key 'embed.weight' has shape \(512, 100, 7\), expected "
                                                 r"\(256, 100, 7\)"):
        ck.load_vocos_checkpoint(str(directory))


def test_variant_mismatch_names_config_json(hf_dirs):
    with pytest.raises(ck.CheckpointError, match=r"config.json: a encodec Vocos checkpoint, but a mel one"):
        ck.load_vocos_checkpoint(str(hf_dirs["flat", "encodec", "safetensors"]), expected_variant="mel")


def _tree(directory: Path) -> Dict[str, str]:
    return {str(p.relative_to(directory)): ck.sha256_of(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_failed_make_repository_leaves_the_output_as_it_was(repository, hf_dirs, checkpoint_paths, tmp_path):
    """``main()`` on a corrupted checkpoint exits non-zero and leaves a previous repository byte for byte,
    with no staging folder beside it."""
    output = tmp_path / "model_repository"
    shutil.copytree(repository, output)
    before = _tree(output)
    broken = _copy(hf_dirs["flat", "encodec", "safetensors"], tmp_path)
    _rewrite_safetensors(broken / "model.safetensors",
                         lambda s: {k: v for k, v in s.items() if k != "decoder.window"})
    code = export.main(["--output", str(output), "--mel", str(hf_dirs["flat", "mel", "safetensors"]),
                        "--encodec", str(broken), "--encodec-checkpoint", str(checkpoint_paths["encodec"])])
    assert code == 2
    assert _tree(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model_repository", broken.name])


def test_a_parity_failure_midway_leaves_the_output_as_it_was(repository, mel_checkpoint, tmp_path, monkeypatch):
    """The first artifact verifies and is written, the next does not: nothing of the new build reaches the
    output."""
    output = tmp_path / "model_repository"
    shutil.copytree(repository, output)
    before = _tree(output)
    original = export.ModuleArtifact.save_verified
    written = []

    def second_one_fails(self, version_dir, freeze):
        if written:
            raise export.ParityError(f"{self.name}: refused by the test")
        written.append(self.name)
        return original(self, version_dir, freeze)

    monkeypatch.setattr(export.ModuleArtifact, "save_verified", second_one_fails)
    with pytest.raises(export.ParityError):
        export.build_repository_atomically(output, mel_checkpoint, None, None)
    assert written == [Model.MEL_FEATURES]
    assert _tree(output) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model_repository"]


def test_atomic_build_replaces_a_previous_repository_whole(mel_checkpoint, tmp_path):
    output = tmp_path / "model_repository"
    (output / "stale").mkdir(parents=True)
    (output / "stale" / "leftover.txt").write_text("from an older build")
    written = export.build_repository_atomically(output, mel_checkpoint, None, None)
    assert set(written) == {Model.MEL_FEATURES, Model.VOCOS_MEL, Model.VOCOS_MEL_STREAM}
    assert not (output / "stale").exists()
    assert (output / Model.VOCOS_MEL / "1" / ARTIFACT).is_file()
    assert oct(output.stat().st_mode & 0o777) == oct(0o755)
    assert [p.name for p in tmp_path.iterdir()] == ["model_repository"]


# ---------------------------------------------------------------------------------------------------------
# Hub ids of both layouts: the real huggingface_hub code path, from a warm cache (no network here)
# ---------------------------------------------------------------------------------------------------------

def _cache_repo(hub_cache: Path, repo_id: str, files: Dict[str, Path]) -> None:
    """A hub cache entry as huggingface_hub writes it (refs/main -> snapshots/<commit>/<file>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        shutil.copy(path, snapshot / name)


def test_hub_ids_of_both_layouts_load_from_the_cache_offline(hf_dirs, checkpoint_paths, tmp_path):
    hub_cache = tmp_path / "hf" / "hub"
    hf_mel = hf_dirs["flat", "mel", "safetensors"]
    _cache_repo(hub_cache, "Manel/vocos-mel-24khz",
                {"config.json": hf_mel / "config.json", "model.safetensors": hf_mel / "model.safetensors"})
    hf_encodec = hf_dirs["flat", "encodec", "bin"]
    _cache_repo(hub_cache, "Manel/vocos-encodec-24khz",
                {"config.json": hf_encodec / "config.json", "pytorch_model.bin": hf_encodec / "pytorch_model.bin"})
    upstream = checkpoint_paths[Model.VOCOS_MEL]
    _cache_repo(hub_cache, "charactr/vocos-mel-24khz",
                {"config.yaml": upstream / "config.yaml", "pytorch_model.bin": upstream / "pytorch_model.bin"})
    script = textwrap.dedent("""
        import json
        from vocos_triton.build import checkpoints as ck
        out = {}
        for repo_id, variant in [("Manel/vocos-mel-24khz", "mel"), ("Manel/vocos-encodec-24khz", "encodec"),
                                 ("charactr/vocos-mel-24khz", "mel")]:
            c = ck.load_vocos_checkpoint(repo_id, expected_variant=variant)
            out[repo_id] = [c.layout, sorted(c.sha256), len(c.state_dict)]
        try:
            ck.load_vocos_checkpoint("hf-audio/vocos-mel-24khz")
        except ck.WeightsUnavailable as exc:
            out["missing"] = str(exc)
        print(json.dumps(out))
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["Manel/vocos-mel-24khz"][:2] == ["transformers", ["config.json", "model.safetensors"]]
    assert out["Manel/vocos-encodec-24khz"][:2] == ["transformers", ["config.json", "pytorch_model.bin"]]
    assert out["charactr/vocos-mel-24khz"][:2] == ["upstream", ["config.yaml", "pytorch_model.bin"]]
    assert out["Manel/vocos-mel-24khz"][2] == out["charactr/vocos-mel-24khz"][2]  # same upstream keys
    assert "hf-audio/vocos-mel-24khz" in out["missing"] and "HF_HUB_OFFLINE is set" in out["missing"]
    assert "config.json" in out["missing"] and "RANDOM_WEIGHTS=1" in out["missing"]
