"""Against a real tritonserver (started once per session): parity, batching, errors, health."""
from __future__ import annotations

import queue
import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from vocos_triton.contract import (
    BANDWIDTHS,
    CODEBOOKS,
    DEFAULT_VARIANT,
    ENCODEC_24KHZ,
    MEL_24KHZ,
    Limits,
    Model,
    split_model_name,
)
from vocos_triton.launcher import metrics
from vocos_triton.launcher.memory import stat_fields, torch_workers
from vocos_triton.launcher.profiles import load_config
from vocos_triton.launcher.server import LaunchError, ServerOptions, TritonServer, free_port
from vocos_triton.launcher.watchdog import python_stubs
from vocos_triton.speech import speech_clip

import reference_outputs as ref
from triton_helpers import bandwidth_tensor, infer, make_inputs, settled_counts

TOLERANCE = 1e-4
SOLO_TOLERANCE = 1e-5


class TestParityOverGrpc:
    def test_mel_features(self, grpc_client, reference_mel, speech_3s):
        mel = infer(grpc_client, "mel_features", output="mel", audio=speech_3s)
        assert mel.shape == (100, MEL_24KHZ.frames(speech_3s.shape[0]))
        assert ref.max_error(mel, ref.mel_features(reference_mel, speech_3s)) <= TOLERANCE

    def test_vocos_mel(self, grpc_client, reference_mel, speech_3s):
        mel = ref.mel_features(reference_mel, speech_3s)
        wave = infer(grpc_client, "vocos_mel", mel=mel)
        assert wave.shape == ((mel.shape[1] - 1) * 256,)
        assert ref.max_error(wave, ref.mel_decode(reference_mel, mel)) <= TOLERANCE

    def test_resynthesize_mel(self, grpc_client, reference_mel, speech_3s):
        wave = infer(grpc_client, "resynthesize_mel", audio=speech_3s)
        assert ref.max_error(wave, ref.mel_resynthesize(reference_mel, speech_3s)) <= TOLERANCE

    @pytest.mark.parametrize("bandwidth", BANDWIDTHS)
    def test_encodec_steps_and_resynthesis(self, grpc_client, reference_encodec, speech_3s, bandwidth):
        bw = bandwidth_tensor(bandwidth)
        codes = infer(grpc_client, "encodec_encoder", output="codes", audio=speech_3s, bandwidth=bw)
        expected_codes = ref.encodec_codes(reference_encodec, speech_3s, bandwidth)
        assert codes.shape == (CODEBOOKS[BANDWIDTHS.index(bandwidth)], -(-speech_3s.shape[0] // 320))
        np.testing.assert_array_equal(codes, expected_codes)

        result = grpc_client.infer("encodec_embedding", make_inputs({"codes": codes, "bandwidth": bw}))
        features = result.as_numpy("features")[0]
        assert result.as_numpy("bandwidth_id")[0].tolist() == [BANDWIDTHS.index(bandwidth)]
        assert ref.max_error(features, ref.codes_to_features(reference_encodec, codes)) <= TOLERANCE

        wave = infer(grpc_client, "vocos_encodec", features=features,
                     bandwidth_id=np.array([BANDWIDTHS.index(bandwidth)], np.int64))
        assert ref.max_error(wave, ref.encodec_decode(reference_encodec, features, bandwidth)) <= TOLERANCE

        wave = infer(grpc_client, "resynthesize_encodec", audio=speech_3s, bandwidth=bw)
        assert ref.max_error(wave, ref.encodec_resynthesize(reference_encodec, speech_3s, bandwidth)) <= TOLERANCE

    def test_decode_codes_like_the_transformers_doc(self, grpc_client, reference_encodec):
        codes = np.random.default_rng(0).integers(0, 1024, size=(8, 200), dtype=np.int64)  # Bark-style fine tokens
        wave = infer(grpc_client, "decode_codes", codes=codes, bandwidth=bandwidth_tensor(6.0))
        assert wave.shape == (64_000,)
        assert ref.max_error(wave, ref.decode_codes(reference_encodec, codes, 6.0)) <= TOLERANCE


def _concurrent(client, model: str, requests: List[Dict[str, np.ndarray]]) -> List[Tuple[object, object]]:
    """Send all requests at once (async), return (result, error) per request in order."""
    done: queue.Queue[Tuple[int, object, object]] = queue.Queue()
    for i, inputs in enumerate(requests):
        client.async_infer(model, make_inputs(inputs), callback=lambda result, error, i=i: done.put((i, result, error)),
                           client_timeout=120)
    results: List[Tuple[object, object]] = [(None, None)] * len(requests)
    for _ in requests:
        i, result, error = done.get(timeout=180)
        results[i] = (result, error)
    return results


@pytest.mark.parametrize("model", ["vocos_mel", "resynthesize_mel", "decode_codes"])
def test_concurrent_requests_of_different_lengths_are_batched_and_equal_solo(grpc_client, reference_mel, model):
    rng = np.random.default_rng(1)
    lengths = [24_000, 7_001, 48_000, 2_560, 30_011, 12_345, 600, 19_999, 40_000, 5_555]
    if model == "decode_codes":
        requests = [{"codes": rng.integers(0, 1024, (CODEBOOKS[i % 4], n // 320 + 1), dtype=np.int64),
                     "bandwidth": bandwidth_tensor(BANDWIDTHS[i % 4])} for i, n in enumerate(lengths)]
        step = "vocos_encodec"
    else:
        clips = [speech_clip(n, seed=20 + i) for i, n in enumerate(lengths)]
        requests = ([{"mel": ref.mel_features(reference_mel, c)} for c in clips] if model == "vocos_mel"
                    else [{"audio": c} for c in clips])
        step = "vocos_mel"
    start = settled_counts(grpc_client, step)
    solo = [infer(grpc_client, model, **r) for r in requests]
    before = settled_counts(grpc_client, step, start, len(requests))
    results = _concurrent(grpc_client, model, requests)
    after = settled_counts(grpc_client, step, before, len(requests))
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(requests)
    assert executions < inferences, f"{step}: {executions} executions for {inferences} inferences: no batching"
    for (result, error), alone in zip(results, solo):
        assert error is None, error
        assert ref.max_error(result.as_numpy("waveform")[0], alone) <= SOLO_TOLERANCE


def test_bad_request_in_a_batch_fails_alone(grpc_client, reference_mel, speech_1s):
    mel = ref.mel_features(reference_mel, speech_1s)
    good = {"mel": mel}
    requests = [good, {"mel": np.full_like(mel, np.nan)}, good, {"mel": mel[:, :1].copy()}, good, good]
    expected = infer(grpc_client, "vocos_mel", **good)
    results = _concurrent(grpc_client, "vocos_mel", requests)
    for i, (result, error) in enumerate(results):
        if i in (1, 3):
            assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.INVALID_ARGUMENT"
            assert error.message().startswith("mel: expected")
        else:
            assert error is None and ref.max_error(result.as_numpy("waveform")[0], expected) <= SOLO_TOLERANCE


MEL = np.zeros((100, 50), np.float32)
AUDIO = np.zeros(4_800, np.float32)
CODES = np.zeros((8, 20), np.int64)
BW6 = bandwidth_tensor(6.0)
BAD_INPUTS = {
    # case: (model, inputs, batch?, tensor named in the message, text in the message)
    "wrong dtype": ("vocos_mel", {"mel": MEL.astype(np.float64)}, True, "mel", "FP32"),
    "wrong rank": ("vocos_mel", {"mel": MEL[0]}, True, "mel", "unexpected shape"),
    "wrong channel count": ("vocos_mel", {"mel": np.zeros((80, 50), np.float32)}, True, "mel", "[-1,100,-1]"),
    "mel too short": ("vocos_mel", {"mel": MEL[:, :1].copy()}, True, "mel", "expected at least 2 frames, got 1"),
    "mel too long": ("vocos_mel",
                     {"mel": np.zeros((100, MEL_24KHZ.frames(Limits(60).max_samples(MEL_24KHZ)) + 1), np.float32)},
                     True, "mel", "never truncated"),
    "empty audio": ("resynthesize_mel", {"audio": AUDIO[:0]}, True, "audio", "got an empty audio"),
    "audio too short for the mel": ("mel_features", {"audio": AUDIO[:512]}, True, "audio", "at least 513 samples"),
    "audio too long": ("resynthesize_encodec",
                       {"audio": np.zeros(Limits(60).max_samples(ENCODEC_24KHZ) + 1, np.float32), "bandwidth": BW6},
                       True, "audio", "at most 1440000 samples (60 s)"),
    "NaN audio": ("resynthesize_mel", {"audio": np.where(np.arange(4_800) == 7, np.nan, AUDIO).astype(np.float32)},
                  True, "audio", "got NaN at index [7]"),
    "Inf mel": ("vocos_mel", {"mel": np.where(np.arange(50) == 3, np.inf, MEL).astype(np.float32)}, True, "mel",
                "got Inf"),
    "codes out of range": ("decode_codes", {"codes": CODES + 1024, "bandwidth": BW6}, True, "codes",
                           "expected values in [0, 1024), got 1024"),
    "negative codes": ("decode_codes", {"codes": CODES - 1, "bandwidth": BW6}, True, "codes", "got -1"),
    "K not in 2/4/8/16": ("decode_codes", {"codes": CODES[:5], "bandwidth": BW6}, True, "codes", "got 5"),
    "bandwidth not in the set": ("decode_codes", {"codes": CODES, "bandwidth": bandwidth_tensor(5.0)}, True,
                                 "bandwidth", "expected one of 1.5, 3, 6, 12 kbps, got 5"),
    "bandwidth inconsistent with K": ("decode_codes", {"codes": CODES, "bandwidth": bandwidth_tensor(12.0)}, True,
                                      "codes", "8 codebooks do not match bandwidth 12 kbps"),
    "encoder bandwidth": ("resynthesize_encodec", {"audio": AUDIO, "bandwidth": bandwidth_tensor(24.0)}, True,
                          "bandwidth", "got 24"),
    "bandwidth_id out of range": ("vocos_encodec", {"features": np.zeros((128, 20), np.float32),
                                                    "bandwidth_id": np.array([4], np.int64)}, True,
                                  "bandwidth_id", "expected an id in 0..3, got 4"),
    "wrong feature channels": ("vocos_encodec", {"features": np.zeros((100, 20), np.float32),
                                                 "bandwidth_id": np.array([0], np.int64)}, True, "features", "128"),
    "oversize batch": ("vocos_mel", {"mel": np.zeros((9, 100, 50), np.float32)}, False, "", "batch-size must be <= 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_get_invalid_argument_and_the_server_stays_healthy(grpc_client, reference_mel, speech_1s, case):
    model, inputs, batch, tensor, text = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer(model, make_inputs(inputs, batch), client_timeout=60)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = info.value.message()
    assert text in message
    assert f"{tensor}:" in message or f"'{tensor}'" in message
    assert grpc_client.is_server_ready() and grpc_client.is_model_ready(model)
    wave = infer(grpc_client, "resynthesize_mel", audio=speech_1s)
    assert ref.max_error(wave, ref.mel_resynthesize(reference_mel, speech_1s)) <= TOLERANCE


def test_readiness_and_metrics_endpoints(triton):
    with urllib.request.urlopen(f"{triton.http_url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    assert "nv_inference_request_success" in metrics and 'model="vocos_mel"' in metrics


def test_launcher_refuses_a_port_in_use(repository, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = ServerOptions(model_repository=repository, grpc_port=port, http_port=free_port(),
                                metrics_port=free_port(), build_dir=tmp_path)
        with pytest.raises(LaunchError, match=f"gRPC port {port} on 127.0.0.1 is in use"):
            TritonServer(options).start()


def test_free_ports_are_never_handed_out_twice(repository, tmp_path):
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    same = ServerOptions(model_repository=repository, grpc_port=ports[0], http_port=ports[0],
                         metrics_port=ports[1], build_dir=tmp_path)
    with pytest.raises(LaunchError, match="ports must differ"):
        TritonServer(same).start()


def test_launcher_refuses_a_repository_without_artifacts(tmp_path):
    options = ServerOptions(model_repository=tmp_path, grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=tmp_path)
    with pytest.raises(LaunchError, match="make repository"):
        TritonServer(options).start()


def test_stubs_run_in_the_serving_runtime_and_only_the_streaming_ones_import_torch(triton):
    """Each stub embeds the runtime's Python. The numpy embedding and mel front end map no torch at all;
    the batched TorchScript models' stubs map none either: their forwards run in a worker forked from the
    torch host, which maps the runtime's torch (one import for all of them); the streaming stubs import it
    themselves."""
    runtime = triton.runtime
    stubs = python_stubs(triton.process.pid)
    configs = {path.parent.name: load_config(path)
               for path in triton.options.model_repository.glob("*/config.pbtxt")}
    python_models = [name for name, config in configs.items() if config.backend == "python"]
    assert {Model.ENCODEC_EMBEDDING, Model.ENCODEC_ENCODER, Model.MEL_FEATURES, Model.VOCOS_ENCODEC, Model.VOCOS_MEL,
            Model.VOCOS_MEL_STREAM, Model.DECODE_CODES_STREAM} <= set(python_models)
    # one stub per instance: the default variant's batched models run two (docs/architecture.md), the streaming
    # ones and every model of a variant one
    instances = {m: sum(g.count for g in configs[m].instance_group) for m in python_models}
    assert Counter(stubs.values()) == instances
    assert instances[Model.VOCOS_MEL] == 2 and instances[Model.VOCOS_MEL_STREAM] == 1
    assert all(count == 1 for m, count in instances.items() if split_model_name(m)[1] != DEFAULT_VARIANT)
    workers = {stub: worker for worker, stub in torch_workers(stubs).items()}

    def torch_libraries(pid: int) -> set:
        return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                if "libtorch_cpu.so" in line}

    hosts = set()
    for pid, name in stubs.items():
        model = split_model_name(name)[0]
        libraries = torch_libraries(pid)
        if model in (Model.ENCODEC_EMBEDDING, Model.MEL_FEATURES):  # numpy (and MKL's FFT) only
            assert not libraries, f"{model} imported torch"
            assert pid not in workers
        elif model in (Model.VOCOS_MEL_STREAM, Model.DECODE_CODES_STREAM):
            assert libraries and all(lib.startswith(f"{runtime.prefix}/") for lib in libraries), (model, libraries)
        else:  # vocoders and the encoder: numpy in the stub, the forwards in its own torch worker
            assert not libraries, f"{name}'s stub imported torch"
            worker_libraries = torch_libraries(workers[pid])
            assert worker_libraries and all(lib.startswith(f"{runtime.prefix}/") for lib in worker_libraries)
            hosts.add(int(stat_fields(workers[pid])[1]))  # the worker's parent
    assert hosts == {triton.torch_host.process.pid}  # one host forked them all


def test_launcher_refuses_a_runtime_that_cannot_serve(repository, tmp_path):
    options = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=tmp_path, runtime_python=tmp_path / "no" / "python")
    with pytest.raises(LaunchError, match="make runtime"):
        TritonServer(options).start()


def test_requests_cancelled_while_queued_are_skipped(triton, grpc_client, reference_mel, speech_1s):
    """A client that gave up (deadline) while its request queued behind a long one costs no compute.

    With a queue policy (docs/exposure.md) tritonserver itself drops a cancelled request from the
    queue; one that reaches the stub anyway is skipped there (logged). Either way it never succeeds."""
    def successes() -> int:
        stats = grpc_client.get_inference_statistics("vocos_mel", as_json=True)["model_stats"][0]
        return int(stats["inference_stats"].get("success", {}).get("count", 0))

    before = triton.log_file.read_text().count("skipped a request cancelled by its client")
    succeeded_before = successes()
    done: queue.Queue[object] = queue.Queue()
    long_mel = np.zeros((100, 5_600), np.float32)  # about 60 s of audio: keeps an instance of vocos_mel busy
    for _ in range(2):  # one for each of the model's two instances (sent together, they would share one)
        grpc_client.async_infer("vocos_mel", make_inputs({"mel": long_mel}),
                                callback=lambda result, error: done.put(error), client_timeout=120)
        time.sleep(0.1)
    statuses = []
    for _ in range(3):
        try:
            grpc_client.infer("vocos_mel", make_inputs({"mel": long_mel[:, :5_000].copy()}), client_timeout=0.2)
        except InferenceServerException as exc:
            statuses.append(exc.status())
    assert done.get(timeout=120) is None and done.get(timeout=120) is None
    assert statuses.count("StatusCode.DEADLINE_EXCEEDED") >= 1
    mel = ref.mel_features(reference_mel, speech_1s)
    assert ref.max_error(infer(grpc_client, "vocos_mel", mel=mel), ref.mel_decode(reference_mel, mel)) <= TOLERANCE
    expected = succeeded_before + 3 + (3 - len(statuses))  # the long ones, the check, any of the 3 that finished
    succeeded = metrics.settled(successes, lambda count: count >= expected)  # counted when released
    after = triton.log_file.read_text().count("skipped a request cancelled by its client")
    assert succeeded == expected, "a request cancelled while queued was computed"
    assert after >= before
