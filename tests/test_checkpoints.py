"""Checkpoint loading in the upstream formats, the random fixtures' fidelity to them, and errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from vocos_triton.build import checkpoints as ck
from vocos_triton.build.random_checkpoints import ENCODEC_CONFIG, MEL_CONFIG


def test_local_directory_loads_with_sha256(mel_checkpoint, checkpoint_paths):
    directory = checkpoint_paths["vocos_mel"]
    assert mel_checkpoint.variant == "mel"
    assert mel_checkpoint.sha256["pytorch_model.bin"] == ck.sha256_of(directory / "pytorch_model.bin")
    assert mel_checkpoint.sha256["config.yaml"] == ck.sha256_of(directory / "config.yaml")


def test_mel_fixture_matches_the_upstream_model_exactly(mel_checkpoint):
    """Same keys, shapes and dtypes as what ``Vocos.from_hparams`` on the hub config expects."""
    from vocos import Vocos

    model = Vocos.from_hparams(str(mel_checkpoint.config_path))
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in mel_checkpoint.state_dict.items()}
    assert got == expected
    model.load_state_dict(mel_checkpoint.state_dict)
    assert sum(p.numel() for p in model.parameters()) == 13_531_650  # the 13.5 M-parameter mel model
    assert yaml.safe_load(mel_checkpoint.config_path.read_text()) == yaml.safe_load(MEL_CONFIG)


def test_encodec_vocos_fixture_has_the_vocos_part_of_the_upstream_keys(reference_encodec, encodec_vocos_checkpoint):
    upstream = {k: tuple(v.shape) for k, v in reference_encodec.state_dict().items()
                if not k.startswith("feature_extractor.encodec.")}
    got = {k: tuple(v.shape) for k, v in encodec_vocos_checkpoint.state_dict.items()}
    assert got == upstream
    assert got["feature_extractor.codebook_weights"] == (16 * 1024, 128)
    assert yaml.safe_load(encodec_vocos_checkpoint.config_path.read_text()) == yaml.safe_load(ENCODEC_CONFIG)


def test_encodec_fixture_is_an_encodec_24khz_state_dict(encodec_checkpoint):
    from encodec import EncodecModel

    model = EncodecModel.encodec_model_24khz(pretrained=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in encodec_checkpoint.state_dict.items()} == expected
    assert not encodec_checkpoint.official
    codebook = encodec_checkpoint.state_dict["quantizer.vq.layers.0._codebook.embed"]
    assert codebook.abs().sum() > 0, "pretrained=False leaves all-zero codebooks; the fixture must not"
    # the Vocos codebook_weights are the same (random) codebooks, as in the real pair
    assert encodec_checkpoint.state_dict["quantizer.vq.layers.3._codebook.embed"].shape == (1024, 128)


def test_codebook_weights_match_the_encodec_codebooks(encodec_vocos_checkpoint, encodec_checkpoint):
    weights = encodec_vocos_checkpoint.state_dict["feature_extractor.codebook_weights"]
    for i in range(16):
        assert torch.equal(weights[i * 1024 : (i + 1) * 1024],
                           encodec_checkpoint.state_dict[f"quantizer.vq.layers.{i}._codebook.embed"])


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def test_missing_weights_file(checkpoint_paths, tmp_path):
    directory = _copy(checkpoint_paths["vocos_mel"], tmp_path)
    (directory / "pytorch_model.bin").unlink()
    with pytest.raises(ck.CheckpointError, match=r"pytorch_model\.bin: file not found"):
        ck.load_vocos_checkpoint(str(directory))


def test_corrupt_weights_file(checkpoint_paths, tmp_path):
    directory = _copy(checkpoint_paths["vocos_mel"], tmp_path)
    path = directory / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: 1 << 20])  # truncated download
    with pytest.raises(ck.CheckpointError, match="not a readable PyTorch checkpoint"):
        ck.load_vocos_checkpoint(str(directory))


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    path = tmp_path / "evil.th"
    torch.save({"weight": torch.zeros(1), "payload": shutil.rmtree}, path)
    with pytest.raises(ck.CheckpointError, match="not a readable PyTorch checkpoint"):
        ck.load_state_dict(path)


def test_wrong_config(checkpoint_paths, tmp_path):
    directory = _copy(checkpoint_paths["vocos_mel"], tmp_path)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["feature_extractor"]["class_path"] = "vocos.feature_extractors.Unknown"
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    unsupported = "feature_extractor 'vocos.feature_extractors.Unknown' is not supported"
    with pytest.raises(ck.CheckpointError, match=unsupported):
        ck.load_vocos_checkpoint(str(directory))


def test_config_that_disagrees_with_the_weights(checkpoint_paths, tmp_path):
    directory = _copy(checkpoint_paths["vocos_mel"], tmp_path)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["backbone"]["init_args"]["dim"] = config["head"]["init_args"]["dim"] = 256  # consistent, not the weights'
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoint = ck.load_vocos_checkpoint(str(directory))
    with pytest.raises(ck.CheckpointError) as info:
        ck.build_reference_vocos(checkpoint)
    assert str(info.value).startswith(f"{directory / 'pytorch_model.bin'}: does not match {directory / 'config.yaml'}: "
                                      "shape mismatch: 'backbone.embed.weight' is (512, 100, 7) in the weights, "
                                      "(256, 100, 7) for the config")


def test_config_whose_backbone_and_head_disagree(checkpoint_paths, tmp_path):
    directory = _copy(checkpoint_paths["vocos_mel"], tmp_path)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["backbone"]["init_args"]["dim"] = 256
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ck.CheckpointError, match=r"config.yaml: head.init_args.dim is 512 but backbone.init_args.dim "
                                                 r"is 256; the head projects the backbone's output"):
        ck.load_vocos_checkpoint(str(directory))


def test_default_checkpoints_geometry(mel_checkpoint, encodec_vocos_checkpoint):
    from vocos_triton.contract import ENCODEC_24KHZ, MEL_24KHZ

    assert mel_checkpoint.geometry == MEL_24KHZ and encodec_vocos_checkpoint.geometry == ENCODEC_24KHZ
    assert ck.backbone_shape(mel_checkpoint) == {"dim": 512, "intermediate_dim": 1536, "num_layers": 8}
    assert ck.backbone_shape(encodec_vocos_checkpoint) == {"dim": 384, "intermediate_dim": 1152, "num_layers": 8}


def test_variant_mismatch(checkpoint_paths):
    with pytest.raises(ck.CheckpointError, match="a mel Vocos checkpoint, but a encodec one was expected"):
        ck.load_vocos_checkpoint(str(checkpoint_paths["vocos_mel"]), expected_variant="encodec")


def test_encodec_checkpoint_from_folder_and_missing(checkpoint_paths, tmp_path):
    shutil.copy(checkpoint_paths["encodec"], tmp_path / ck.ENCODEC_CHECKPOINT_NAME)
    assert ck.locate_encodec_checkpoint(str(tmp_path)) == tmp_path / ck.ENCODEC_CHECKPOINT_NAME
    with pytest.raises(ck.CheckpointError, match="file not found"):
        ck.locate_encodec_checkpoint(str(tmp_path / "nowhere.th"))


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable-endpoint"])
def test_offline_hub_fails_fast_with_instructions(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key, value in offline.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ck.WeightsUnavailable) as info:
        ck.load_vocos_checkpoint("charactr/vocos-mel-24khz")
    message = str(info.value)
    assert "charactr/vocos-mel-24khz" in message
    assert "VOCOS_MEL=/path/to/vocos-mel-24khz" in message and "RANDOM_WEIGHTS=1" in message


def test_offline_encodec_download_fails_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(ck, "ENCODEC_URL", "http://127.0.0.1:9/encodec_24khz-d7cc33bc.th")  # nothing listens on 9
    with pytest.raises(ck.WeightsUnavailable, match="ENCODEC_CHECKPOINT=/path/to/encodec_24khz-d7cc33bc.th"):
        ck.locate_encodec_checkpoint(None)


def test_neither_directory_nor_hub_id():
    with pytest.raises(ck.CheckpointError, match="neither a directory"):
        ck.load_vocos_checkpoint("/no/such/dir")
