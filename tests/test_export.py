"""Export: TorchScript artifacts equal the eager modules, carry provenance, and need no reference package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vocos_triton.build import checkpoints as ck
from vocos_triton.build import export
from vocos_triton.build.export import ARTIFACT, PROVENANCE, ParityError, build_repository, pad_batch
from vocos_triton.build.quantize import fidelity
from vocos_triton.modules.vocoder import BatchedVocos
from vocos_triton.serving.codebooks import TABLE_FILE
from vocos_triton.speech import speech_clip

import reference_outputs as ref

MODELS = ["mel_features", "vocos_mel", "encodec_encoder", "encodec_embedding", "vocos_encodec"]


@pytest.mark.parametrize("model", MODELS)
def test_provenance_records_sources_hashes_and_parity(repository: Path, model: str, checkpoint_paths):
    provenance = json.loads((repository / model / "1" / PROVENANCE).read_text())
    assert provenance["model"] == model
    assert provenance["random_weights"] is True and "RANDOM WEIGHTS" in provenance["warning"]
    assert provenance["torch_version"] == torch.__version__
    assert provenance["parity"]["max_abs_error_vs_reference"] <= export.REFERENCE_TOLERANCE
    if model == "encodec_embedding":  # a numpy table, equal to the reference bit for bit
        assert provenance["artifact"]["file"] == TABLE_FILE
        assert provenance["parity"]["max_abs_error_vs_reference"] == 0.0
    else:
        assert provenance["artifact"]["file"] == ARTIFACT
        assert provenance["parity"]["max_abs_error_script_vs_eager"] <= export.SCRIPT_TOLERANCE
    artifact = repository / model / "1" / provenance["artifact"]["file"]
    assert provenance["artifact"]["bytes"] == artifact.stat().st_size
    assert provenance["artifact"]["sha256"] == ck.sha256_of(artifact)
    for source in provenance["sources"].values():
        hashes = source["sha256"]
        assert all(len(h) == 64 for h in (hashes.values() if isinstance(hashes, dict) else [hashes]))


def test_artifacts_equal_eager_on_other_lengths(repository, reference_mel, reference_encodec):
    clips = [speech_clip(n, seed=10 + i) for i, n in enumerate([1_000, 33_333, 4_097])]
    mels = [torch.from_numpy(ref.mel_features(reference_mel, c)) for c in clips]
    frames = torch.tensor([m.shape[-1] for m in mels])
    eager = BatchedVocos(reference_mel).eval()
    scripted = torch.jit.load(str(repository / "vocos_mel" / "1" / ARTIFACT))
    with torch.inference_mode():
        a = eager(pad_batch(mels), frames, torch.zeros_like(frames))
        b = scripted(pad_batch(mels), frames, torch.zeros_like(frames))
    assert float((a - b).abs().max()) <= export.SCRIPT_TOLERANCE

    codes = [torch.from_numpy(ref.encodec_codes(reference_encodec, c, 12.0)) for c in clips]
    encoder = torch.jit.load(str(repository / "encodec_encoder" / "1" / ARTIFACT))
    lengths = torch.tensor([c.shape[0] for c in clips])
    with torch.inference_mode():
        got = encoder(pad_batch([torch.from_numpy(c) for c in clips]), lengths, torch.full((3,), 16))
    for i, c in enumerate(codes):
        assert torch.equal(got[i, :, : c.shape[1]], c)


def test_export_refuses_an_artifact_that_disagrees(tmp_path, monkeypatch, mel_checkpoint):
    class OffByALittle(BatchedVocos):
        def forward(self, features, lengths, condition):
            return super().forward(features, lengths, condition) + 1e-3

    monkeypatch.setattr(export, "BatchedVocos", OffByALittle)
    with pytest.raises(ParityError, match="vocos_mel: eager module differs from the reference"):
        build_repository(tmp_path, mel_checkpoint, None, None)
    assert not (tmp_path / "vocos_mel" / "1" / ARTIFACT).exists()


def test_artifacts_run_without_torchaudio_encodec_or_vocos(repository):
    """The serving runtime needs torch only: block the reference packages and run every artifact."""
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("torchaudio", "encodec", "vocos")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import torch
        import vocos_triton.serving.models  # the Triton-side code imports cleanly too
        import vocos_triton.serving.embedding
        from vocos_triton.serving.codebooks import CodebookTable
        repo = {str(repository)!r}
        audio = torch.randn(2, 24000) * 0.1
        lengths = torch.tensor([24000, 5000])
        load = lambda name: torch.jit.load(f"{{repo}}/{{name}}/1/model.pt")
        mel = load("mel_features")(audio, lengths)
        wave = load("vocos_mel")(mel, torch.tensor([94, 20]), torch.zeros(2, dtype=torch.long))
        codes = load("encodec_encoder")(audio, lengths, torch.tensor([8, 2]))
        codes = codes.clamp(min=0)
        table = CodebookTable.load(f"{{repo}}/encodec_embedding/1/codebooks.npy")
        features = torch.from_numpy(np.stack([table.features(codes[0, :8].numpy()),
                                              table.features(codes[1, :2].numpy())]))
        wave2 = load("vocos_encodec")(features, torch.tensor([75, 16]), torch.tensor([2, 0]))
        assert wave.shape == (2, 93 * 256) and wave2.shape == (2, 75 * 320), (wave.shape, wave2.shape)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_embedding_model_runs_without_torch(repository):
    """The encodec_embedding stub must not pay for a torch import: its code imports none."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from vocos_triton.serving.codebooks import CodebookTable
        from vocos_triton.serving.embedding import EncodecEmbeddingModel
        table = CodebookTable.load({str(repository / "encodec_embedding" / "1" / TABLE_FILE)!r})
        assert table.features(np.zeros((8, 75), np.int64)).shape == (128, 75)
        assert "torch" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_artifact_sizes_are_what_the_weights_need(repository):
    sizes = {m: (repository / m / "1" / json.loads((repository / m / "1" / PROVENANCE).read_text())["artifact"]["file"])
             .stat().st_size for m in MODELS}
    assert 53e6 < sizes["vocos_mel"] < 56e6  # 13.5 M float32 parameters
    assert sizes["encodec_embedding"] < 9e6  # 16 x 1024 x 128 float32 codebook weights
    assert sizes["mel_features"] < 1e6  # window + filterbank
    assert np.all(np.array(list(sizes.values())) > 0)


def test_make_repository_without_weights_fails_fast_with_instructions(tmp_path):
    """What `make serve` does first on an offline machine with no weights: stop at once and say how."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "vocos_triton.build.export", "--output", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "charactr/vocos-mel-24khz" in result.stderr and "RANDOM_WEIGHTS=1" in result.stderr
    assert "VOCOS_MEL=/path/to/vocos-mel-24khz" in result.stderr
    assert not (tmp_path / "repo" / "vocos_mel" / "1" / ARTIFACT).exists()


def test_opt_in_int8_vocoder_records_its_fidelity_and_stays_batch_independent(tmp_path, mel_checkpoint,
                                                                              reference_mel):
    """int8 runs each item alone, so its batch only moves int8 rounding (a 1e-7 difference in an fp32
    convolution can flip one activation's int8 step): far below the int8-vs-fp32 error, not 1e-5."""
    written = build_repository(tmp_path, mel_checkpoint, None, None, precision="int8")
    provenance = written["vocos_mel"]
    assert provenance["precision"] == "int8" and written["mel_features"]["precision"] == "fp32"
    assert provenance["parity"]["min_snr_db_vs_reference"] >= export.INT8_MIN_SNR_DB
    vocoder = torch.jit.load(str(tmp_path / "vocos_mel" / "1" / ARTIFACT))
    clips = [speech_clip(n, seed=30 + i) for i, n in enumerate([24_000, 9_000, 40_000])]
    mels = [torch.from_numpy(ref.mel_features(reference_mel, c)) for c in clips]
    frames = torch.tensor([m.shape[-1] for m in mels])
    with torch.inference_mode():
        batched = vocoder(pad_batch(mels), frames, torch.zeros(3, dtype=torch.long))
        for i, m in enumerate(mels):
            alone = vocoder(m[None], frames[i : i + 1], torch.zeros(1, dtype=torch.long))[0]
            n = alone.shape[-1]
            assert fidelity(alone, batched[i, :n])["snr_db"] >= provenance["parity"]["min_snr_db_vs_reference"] + 6


def test_int8_vocoder_keeps_the_mode_of_its_source(reference_mel):
    """The bench and the export freeze it, which needs eval mode: the wrapper must not reset it."""
    from vocos_triton.build.quantize import quantize_vocoder

    quantized = quantize_vocoder(BatchedVocos(reference_mel).eval())
    assert not any(m.training for m in quantized.modules())
    torch.jit.freeze(torch.jit.script(quantized))
