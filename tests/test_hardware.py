"""Issue 16: the Linear kernel chosen by measurement, the roofline report, the fp16 backbone, gpu-check."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vocos_triton.build import export
from vocos_triton.build.export import ARTIFACT, PROVENANCE, ParityError, build_repository, pad_batch
from vocos_triton.build.half import halve_vocoder
from vocos_triton.build.quantize import fidelity, quantize_vocoder
from vocos_triton.contract import MEL_24KHZ, split_model_name
from vocos_triton.launcher.runtime import default_runtime_python, runtime_environment
from vocos_triton.modules.vocoder import ATEN, LINEAR_KERNELS, ONEDNN, BatchedVocos, check_linear_kernel
from vocos_triton.serving import kernels
from vocos_triton.speech import speech_clip

import reference_outputs as ref

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "load_tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


roofline = _load("roofline")
gpu_check = _load("gpu_check")


def _mel_batch(reference_mel, samples=(24_000, 9_000, 40_000)):
    mels = [torch.from_numpy(ref.mel_features(reference_mel, speech_clip(n, seed=70 + i)))
            for i, n in enumerate(samples)]
    frames = torch.tensor([m.shape[-1] for m in mels])
    return mels, (pad_batch(mels), frames, torch.zeros(len(mels), dtype=torch.long))


# -- the Linear kernel -----------------------------------------------------------------------------
def test_frozen_artifact_switches_its_linear_kernel_and_both_equal_the_reference(repository, reference_mel):
    vocoder = torch.jit.load(str(repository / "vocos_mel" / "1" / ARTIFACT)).eval()
    assert kernels.switchable(vocoder) and vocoder.linear_kernel() == ONEDNN
    mels, args = _mel_batch(reference_mel)
    samples = vocoder.output_samples(args[1])
    with torch.inference_mode():
        for kernel in LINEAR_KERNELS:
            vocoder.set_linear_kernel(kernel)
            assert vocoder.linear_kernel() == kernel
            out = vocoder(*args)
            for i, mel in enumerate(mels):  # each item's own samples (past them is what the caller cuts off)
                expected = ref.mel_decode(reference_mel, mel.numpy())
                assert ref.max_error(out[i, : int(samples[i])].numpy(), expected) <= 1e-5, kernel


def test_frozen_streaming_artifact_switches_its_linear_kernel_and_both_equal_the_reference(repository,
                                                                                          reference_mel):
    from vocos_triton.modules.streaming import decode_in_chunks

    streaming = torch.jit.load(str(repository / "vocos_mel_stream" / "1" / ARTIFACT)).eval()
    assert kernels.switchable(streaming) and streaming.linear_kernel() == ONEDNN
    mel = ref.mel_features(reference_mel, speech_clip(30_000, seed=71))
    expected = ref.mel_decode(reference_mel, mel)
    chunks = [7, 40, mel.shape[-1] - 47]
    with torch.inference_mode():
        for kernel in LINEAR_KERNELS:
            streaming.set_linear_kernel(kernel)
            assert streaming.linear_kernel() == kernel
            audio = torch.cat(decode_in_chunks(streaming, torch.from_numpy(mel), chunks)).numpy()
            assert ref.max_error(audio, expected) <= 1e-4, kernel


def test_measured_choice_keeps_the_faster_kernel_unless_within_the_margin(repository):
    vocoder = torch.jit.load(str(repository / "vocos_encodec" / "1" / ARTIFACT)).eval()
    from vocos_triton.contract import ENCODEC_24KHZ
    from vocos_triton.serving.models import vocoder_probe

    choice = kernels.choose_linear_kernel(vocoder, vocoder_probe(ENCODEC_24KHZ, 2), rounds=2, env={})
    assert choice.how == "measured" and set(choice.seconds) == set(LINEAR_KERNELS)
    beaten = choice.seconds[ATEN] < choice.seconds[ONEDNN] * (1 - kernels.MARGIN)
    assert choice.kernel == (ATEN if beaten else ONEDNN) == vocoder.linear_kernel()
    assert kernels.parse_log("x " + choice.log_line("vocos_encodec") + "\n")["vocos_encodec"] == choice


def test_a_forced_kernel_is_not_measured_and_a_bad_one_is_refused(repository):
    vocoder = torch.jit.load(str(repository / "vocos_mel" / "1" / ARTIFACT)).eval()
    choice = kernels.choose_linear_kernel(vocoder, (), env={kernels.KERNEL_ENV: "ATEN"})
    assert (choice.kernel, choice.how, choice.seconds) == (ATEN, "forced", {}) and vocoder.linear_kernel() == ATEN
    with pytest.raises(ValueError, match="expected one of"):
        kernels.requested_kernel({kernels.KERNEL_ENV: "mkl"})
    with pytest.raises(ValueError, match="expected one of"):
        check_linear_kernel("fast")


def test_kernel_forced_per_model():
    env = {kernels.KERNEL_ENV: "vocos_mel=onednn, vocos_encodec=ATEN"}
    assert kernels.requested_kernel(env, "vocos_mel") == ONEDNN
    assert kernels.requested_kernel(env, "vocos_encodec") == ATEN
    assert kernels.requested_kernel(env, "vocos_mel_stream") == kernels.AUTO  # not named: measured
    with pytest.raises(ValueError, match="expected one of"):
        kernels.requested_kernel({kernels.KERNEL_ENV: "vocos_mel=mkl"}, "vocos_mel")
    with pytest.raises(ValueError, match="<model>=<kernel>"):
        kernels.requested_kernel({kernels.KERNEL_ENV: "vocos_mel=onednn,aten"}, "vocos_mel")


def test_int8_vocoder_has_no_kernel_to_switch(reference_mel):
    quantized = torch.jit.freeze(torch.jit.script(quantize_vocoder(BatchedVocos(reference_mel).eval())),
                                 preserved_attrs=["output_samples"])
    assert not kernels.switchable(quantized)


def test_vocoder_stubs_measure_and_log_their_kernel_in_the_runtime(triton):
    """The stubs (serving runtime, its torch) time both kernels at load and say so in the server log."""
    lines = [line for line in triton.log_file.read_text().splitlines() if kernels.LOG_PREFIX in line]
    by_model: Dict[str, List[kernels.KernelChoice]] = {}
    for line in lines:
        for model, choice in kernels.parse_log(line).items():
            by_model.setdefault(model, []).append(choice)
    torch_models = {"vocos_mel", "vocos_encodec", "vocos_mel_stream", "decode_codes_stream"}
    served = {path.parent.name for path in triton.options.model_repository.glob("*/config.pbtxt")}
    assert set(by_model) == {name for name in served if split_model_name(name)[0] in torch_models}, by_model
    assert torch_models <= set(by_model)  # the default variant's, and every variant's (one instance each)
    for model, choices in by_model.items():
        assert {c.how for c in choices} <= {"measured", "shared"}, (model, choices)
        for choice in choices:
            assert choice.kernel in LINEAR_KERNELS
            assert set(choice.seconds) == set(LINEAR_KERNELS) and all(s > 0 for s in choice.seconds.values())
            assert choice.torch == triton.runtime.torch_version
        # each load of the model: its first instance measures, a second one takes that choice. The two
        # stubs' log lines can land in either order, so a shared choice is matched by its measured times.
        measured = [(c.kernel, c.seconds) for c in choices if c.how == "measured"]
        shared = [(c.kernel, c.seconds) for c in choices if c.how == "shared"]
        assert measured and all(choice in measured for choice in shared), (model, choices)
        two_instances = model in ("vocos_mel", "vocos_encodec")  # the streaming models and variants run one
        assert (len(shared) > 0) == two_instances, (model, choices)


def test_kernel_is_measured_once_per_model_and_server(tmp_path):
    """The instances of a model take the choice its first instance measured; other keys measure."""
    calls: List[str] = []

    def measure(kernel: str) -> kernels.KernelChoice:
        calls.append(kernel)
        return kernels.KernelChoice(kernel, "measured", {k: 0.1 for k in LINEAR_KERNELS})

    first = kernels.measure_once(f"{os.getpid()}-vocos_mel", lambda: measure(ATEN), tmp_path)
    second = kernels.measure_once(f"{os.getpid()}-vocos_mel", lambda: measure("never"), tmp_path)
    other = kernels.measure_once(f"{os.getpid()}-vocos_encodec", lambda: measure(ATEN), tmp_path)
    assert calls == [ATEN, ATEN]
    assert (first.how, second.how, other.how) == ("measured", "shared", "measured")
    assert (second.kernel, second.seconds) == (first.kernel, first.seconds)
    forced = kernels.measure_once("1-forced", lambda: kernels.KernelChoice(ATEN, "forced", {}), tmp_path)
    assert forced.how == "forced" and not (tmp_path / "1-forced.json").exists()  # nothing to share
    # a record of a server that is gone is dropped, not reused by a later server with that pid
    (tmp_path / "999999999-vocos_mel.json").write_text(first.log_line("x"))
    kernels.measure_once(f"{os.getpid()}-x", lambda: measure(ATEN), tmp_path)
    assert not (tmp_path / "999999999-vocos_mel.json").exists()


def test_inprocess_worker_applies_the_stubs_choice(repository, tmp_path):
    """The bench's in-process column runs the kernel the stubs would choose, under the runtime's torch."""
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **{"mel-1s-b1.mel": np.zeros((1, 100, 94), np.float32)})
    env = runtime_environment()
    worker = subprocess.run([str(default_runtime_python()), str(ROOT / "load_tests" / "inprocess_worker.py"),
                             str(repository), str(inputs), "1"], input="run mel-1s-b1\nquit\n", text=True,
                            capture_output=True, timeout=300, env={**env, kernels.KERNEL_ENV: "aten"})
    banner, seconds = worker.stdout.splitlines()[:2]
    assert "vocos_mel: aten (forced" in banner and "vocos_encodec: aten (forced" in banner, worker.stderr
    assert float(seconds) > 0


# -- roofline --------------------------------------------------------------------------------------
AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_info_names_the_cpu_and_its_vector_isa():
    epyc = roofline.cpu_info(AVX2_EPYC, env={})
    assert epyc.model == "AMD EPYC 7B12 (family 23 model 49)" and epyc.isa == ["AVX2", "FMA"]
    assert epyc.vector_isa == "AVX2" and "AVX-512" not in epyc.describe()
    xeon = roofline.cpu_info(SAPPHIRE_RAPIDS, env={})
    assert xeon.vector_isa == "AVX-512" and {"AVX-512 VNNI", "AMX", "AMX INT8"} <= set(xeon.isa)
    capped = roofline.cpu_info(SAPPHIRE_RAPIDS, env=roofline.AVX2_ONLY)
    assert capped.vector_isa == "AVX2" and "ONEDNN_MAX_CPU_ISA=AVX2" in capped.describe()


def test_vocoder_flops_match_torchs_flop_counter(reference_mel, reference_encodec):
    """Counted from the layers' shapes; torch's counter, run on a real decode, must agree (it has no FFT)."""
    for vocos, features in ((reference_mel, torch.randn(1, 100, 200)), (reference_encodec, torch.randn(1, 128, 200))):
        counted = roofline.vocoder_flops(vocos, MEL_24KHZ.sample_rate)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            vocos.decode(features, bandwidth_id=torch.tensor([0]))
        per_frame = counter.get_total_flops() / features.shape[-1]
        assert per_frame == pytest.approx(counted["per_frame"] * (1 - counted["fft_share"]), rel=1e-3)
        assert counted["per_audio_second"] == pytest.approx(counted["per_frame"] * MEL_24KHZ.sample_rate
                                                            / vocos.head.istft.hop_length)


def test_matmul_roofline_measures_each_implementation_and_fractions_follow():
    measured = roofline.matmul_roofline([(64, 128), (128, 64), (64, 128)], rows=256, repeats=2)
    assert set(measured.by_shape) == {"64x128", "128x64"}
    assert all(set(r) >= {"aten"} and min(r.values()) > 0 for r in measured.by_shape.values())
    assert min(max(r.values()) for r in measured.by_shape.values()) <= measured.gflops
    assert measured.gflops <= max(max(r.values()) for r in measured.by_shape.values())
    rows = [{"variant": "mel", "seconds": 10, "batch": 8, "rtf": {"reference": 10.0, "triton": 30.0}}]
    fractions = roofline.roofline_fractions(rows, {"mel": 2.5e9}, 100.0, ("reference", "triton"))
    assert fractions[0]["ceiling_rtf"] == pytest.approx(40.0)
    assert fractions[0]["fraction"] == pytest.approx({"reference": 0.25, "triton": 0.75})


# -- fp16 backbone ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,min_snr_db", [(torch.float16, export.FP16_MIN_SNR_DB), (torch.bfloat16, 20.0)])
def test_half_backbone_keeps_head_and_istft_in_fp32(reference_mel, dtype, min_snr_db):
    fp32 = BatchedVocos(reference_mel).eval()
    half = halve_vocoder(fp32, dtype).eval()
    assert {p.dtype for p in half.backbone.buffers()} | {p.dtype for p in half.backbone.parameters()} == {dtype}
    assert {p.dtype for p in half.head.buffers()} == {torch.float32}
    assert {p.dtype for p in fp32.backbone.buffers()} == {torch.float32}  # the source is left alone
    mels, args = _mel_batch(reference_mel, (9_000, 13_001))
    with torch.inference_mode():
        expected, got = fp32(*args), half(*args)
        scripted = torch.jit.freeze(torch.jit.script(half), preserved_attrs=["output_samples"])(*args)
        alone = half(mels[0][None], args[1][:1], args[2][:1])[0]
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert fidelity(expected, got)["snr_db"] >= min_snr_db
    assert float((scripted - got).abs().max()) <= 1e-5
    n = alone.shape[-1]
    assert fidelity(got[0, :n], alone)["snr_db"] >= fidelity(expected[0, :n], alone)["snr_db"] + 6


def test_fp16_export_records_its_snr_and_the_gate_refuses_a_poor_one(tmp_path, mel_checkpoint, monkeypatch):
    written = build_repository(tmp_path, mel_checkpoint, None, None, precision="fp16")
    provenance = json.loads((tmp_path / "vocos_mel" / "1" / PROVENANCE).read_text())
    assert provenance["precision"] == "fp16" and written["mel_features"]["precision"] == "fp32"
    assert provenance["parity"]["min_snr_db_vs_reference"] >= export.FP16_MIN_SNR_DB
    vocoder = torch.jit.load(str(tmp_path / "vocos_mel" / "1" / ARTIFACT))
    assert not kernels.switchable(vocoder)  # its backbone runs F.linear: oneDNN has no fp16 CPU primitive
    artifact = next(a for a in export.mel_artifacts(mel_checkpoint) if a.name == "vocos_mel")
    strict = replace(artifact.halved(), min_snr_db=provenance["parity"]["min_snr_db_vs_reference"] + 60)
    with pytest.raises(ParityError, match="fp16 module has an SNR of"):
        export.script_and_verify(strict)


# -- gpu-check -------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs for real")
@pytest.mark.parametrize("python", [sys.executable, str(default_runtime_python())], ids=["build", "runtime"])
def test_gpu_check_without_a_gpu_exits_at_once_saying_why(tmp_path, python):
    env = runtime_environment()
    result = subprocess.run([python, str(ROOT / "load_tests" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == gpu_check.EXIT_NO_GPU, result.stderr
    assert result.stderr.startswith("gpu-check: ") and ("no NVIDIA GPU" in result.stderr
                                                         or "CPU-only build" in result.stderr)
    assert not (tmp_path / "out").exists()


def test_gpu_check_load_arithmetic_and_plot(tmp_path):
    assert gpu_check.split(64, 6) == [11, 11, 11, 11, 10, 10] and gpu_check.split(2, 8) == [1, 1]
    stats = gpu_check.summarize([0.010, 0.020, 0.030, 0.040], audio_seconds=1.0, duration_s=2.0)
    assert stats["rps"] == 2.0 and stats["rtf"] == 2.0 and stats["p50_ms"] == pytest.approx(25.0)
    runs = [{"concurrency": c, "rtf": r, "p50_ms": 5.0 * c, "p99_ms": 9.0 * c}
            for c, r in ((1, 100.0), (2, 300.0), (4, 700.0), (8, 800.0))]
    assert gpu_check.half_peak(runs)["concurrency"] == 4
    gpu_check.plot({"triton": {"1 s clips": runs}, "gpu": {"name": "test"}}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
