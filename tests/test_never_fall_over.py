"""The server never falls over: client cancellations never reach tritonserver, and stop is bounded.

Each test here runs its own small tritonserver (``vocos_mel`` and ``vocos_mel_stream`` from the session's
repository, so it starts in seconds) because stopping it is what is tested, or because a crash of
tritonserver 2.51 under cancellations must not take the session's server with it.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2

from vocos_client import VocosClient
from vocos_triton.contract import DEADLINE_PARAMETER, Model
from vocos_triton.launcher import guard, metrics
from vocos_triton.launcher.memory import group_members, stub_regions, torch_workers
from vocos_triton.launcher.profiles import load_config
from vocos_triton.launcher.server import ServerOptions, TritonServer, free_port
from vocos_triton.launcher.watchdog import (
    groups_of,
    next_generation,
    python_stubs,
    replaceable_in_place,
    superseded,
)
from vocos_triton.serving.allocator import anonymous_resident_bytes

import reference_outputs as ref
from triton_helpers import make_inputs

SMALL_REPOSITORY_MODELS = (Model.VOCOS_MEL, Model.VOCOS_MEL_STREAM)
#: what stop() may take beyond the exit timeout: SIGKILL, reaping the stubs, removing their memory
STOP_SLACK_S = 2.0


@pytest.fixture(scope="module")
def small_repository(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    small = tmp_path_factory.mktemp("small_repository")
    for model in SMALL_REPOSITORY_MODELS:
        shutil.copytree(repository / model, small / model)
    return small


def small_server(repository: Path, build: Path, **options: object) -> TritonServer:
    settings = dict(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                    metrics_port=free_port(), build_dir=build, exit_timeout_s=4)
    settings.update(options)
    return TritonServer(ServerOptions(**settings), log_file=build / "tritonserver.log")


@pytest.fixture
def server(small_repository: Path, tmp_path: Path) -> Iterator[TritonServer]:
    server = small_server(small_repository, tmp_path).start()
    yield server
    server.stop()


def stop_and_check(server: TritonServer) -> float:
    """Stop ``server``; asserts nothing of it is left (processes, shared memory); returns the seconds."""
    pid = server.process.pid
    regions = stub_regions(group_members(pid))
    assert regions
    workers = torch_workers(group_members(pid))
    assert workers and server.torch_host is not None
    host = server.torch_host.process.pid
    started = time.monotonic()
    server.stop()
    elapsed = time.monotonic() - started
    assert not group_members(pid), "a stub outlived stop()"
    assert not group_members(host) and not torch_workers(workers.values()), "a torch worker outlived stop()"
    assert not any(region.exists() for region in regions), "stop() left shared memory in /dev/shm"
    assert server.guard is None and not server.running()
    return elapsed


def test_add_deadline_carries_the_clients_deadline_to_triton_and_the_models():
    request = service_pb2.ModelInferRequest(model_name="vocos_mel")
    now = 1_000_000_000_000
    message = service_pb2.ModelInferRequest.FromString(
        guard.add_deadline(service_pb2.ModelInferRequest.FromString(request.SerializeToString()), 2.0,
                           now).SerializeToString())
    assert message.model_name == "vocos_mel"
    assert message.parameters["timeout"].int64_param == int((2.0 - guard.QUEUE_MARGIN_S) * 1e6)
    assert message.parameters[DEADLINE_PARAMETER].int64_param == now + 2_000_000_000
    request.parameters["timeout"].int64_param = 500_000  # a shorter timeout the caller chose is kept
    message = guard.add_deadline(service_pb2.ModelInferRequest.FromString(request.SerializeToString()), 2.0, now)
    assert message.parameters["timeout"].int64_param == 500_000


def test_leading_model_name_reads_the_name_the_parse_reads_or_nothing():
    request = service_pb2.ModelInferRequest(model_name="resynthesize_mel", model_version="1", id="call-1")
    request.parameters["timeout"].int64_param = 4_950_000
    tensor = request.inputs.add(name="audio", datatype="FP32", shape=[1, 1_440_000])
    request.raw_input_contents.append(np.zeros(tensor.shape, np.float32).tobytes())  # 60 s at 24 kHz: 5.8 MB
    wire = request.SerializeToString()
    assert guard.leading_model_name(wire) == service_pb2.ModelInferRequest.FromString(wire).model_name
    long_name = service_pb2.ModelInferRequest(model_name="m" * 300).SerializeToString()  # a 2-byte length
    assert guard.leading_model_name(long_name) == "m" * 300
    # not first (here after the request id, field 3), absent, cut short or not UTF-8: the guard parses
    renamed = service_pb2.ModelInferRequest(id="x").SerializeToString() + service_pb2.ModelInferRequest(
        model_name="vocos_mel").SerializeToString()
    assert service_pb2.ModelInferRequest.FromString(renamed).model_name == "vocos_mel"
    for other in (renamed, service_pb2.ModelInferRequest(id="x").SerializeToString(), wire[:10], b"", b"\n",
                 b"\n\x02\xff\xfe"):
        assert guard.leading_model_name(other) is None, other


def test_a_full_queue_is_refused_at_the_guard_until_tritonserver_answers_otherwise():
    async def scenario() -> None:
        proxy = guard.Guard("127.0.0.1:9", max_in_flight=4)  # never dialled here
        loop = asyncio.get_running_loop()

        def answered(error: Exception = None) -> asyncio.Future:
            answer = loop.create_future()
            answer.set_exception(error) if error else answer.set_result(b"")
            return answer

        def triton_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
            return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

        proxy.in_flight["m"] = 1
        assert not proxy._at_limit("m")
        proxy._note_queue("m", answered(triton_error(grpc.StatusCode.UNAVAILABLE,
                                                     "[request id: <id_unknown>] Exceeds maximum queue size")))
        assert proxy._at_limit("m") and not proxy._at_limit("other")
        proxy.in_flight["m"] = 0  # nothing upstream: one call goes up to find out
        assert not proxy._at_limit("m")
        proxy.in_flight["m"] = 1
        proxy._note_queue("m", answered(triton_error(grpc.StatusCode.INVALID_ARGUMENT, "bad tensor")))
        assert not proxy._at_limit("m")  # any other answer: tritonserver took the call off its queue
        proxy._note_queue("m", answered(triton_error(grpc.StatusCode.UNAVAILABLE, "Exceeds maximum queue size")))
        proxy._note_queue("m", answered())
        assert not proxy._at_limit("m")
        proxy.in_flight["m"] = 4
        assert proxy._at_limit("m")  # the bound itself
        await proxy.channel.close()

    asyncio.run(scenario())


def test_forwarded_metadata_keeps_the_keys_and_drops_the_hop():
    metadata = [("triton-grpc-protocol-vocos-api-key", "k"), ("user-agent", "grpc-python"),
                ("grpc-accept-encoding", "gzip"), (":authority", "x"), ("x-trace", "1")]
    assert guard.forwarded_metadata(metadata) == [("triton-grpc-protocol-vocos-api-key", "k"), ("x-trace", "1")]


def test_every_python_model_can_have_one_instance_replaced_alone():
    """Each instance its own group of one with its own host_policy: what the watchdog's in-place repair needs
    (instances of equal config are interchangeable to tritonserver, which could keep the dead one)."""
    from google.protobuf.json_format import MessageToDict

    root = Path(__file__).resolve().parents[1] / "model_repository"
    for path in sorted(root.glob("*/config.pbtxt")):
        config = load_config(path)
        if config.backend == "python":
            groups = MessageToDict(config, preserving_proto_field_name=True)["instance_group"]
            assert replaceable_in_place(groups), path
            assert all(g["name"].startswith(config.name + "_") for g in groups), path


def test_watchdog_helpers():
    assert next_generation("vocos_mel_0") == "vocos_mel_0.r1"
    assert next_generation("vocos_mel_0.r1") == "vocos_mel_0.r2"
    groups = [{"name": "vocos_mel_0", "count": 1, "host_policy": "vocos_mel_0"},
              {"name": "vocos_mel_1", "count": 1, "host_policy": "vocos_mel_1"}]
    assert replaceable_in_place(groups)
    assert groups_of(groups, {"vocos_mel_1_0"}) == [groups[1]]
    assert not replaceable_in_place([{"name": "m", "count": 2, "host_policy": "m"}])
    assert not replaceable_in_place([dict(g, host_policy="same") for g in groups])
    assert not replaceable_in_place([{"name": "m", "count": 1}])
    before = {10: ("vocos_mel", "vocos_mel_0_0"), 11: ("vocos_mel", "vocos_mel_1_0")}
    in_place = {10: ("vocos_mel", "vocos_mel_0_0"), 12: ("vocos_mel", "vocos_mel_1_0")}
    reloaded_whole = {10: ("vocos_mel", "vocos_mel_0_0"), 13: ("vocos_mel", "vocos_mel_0_0"),
                      12: ("vocos_mel", "vocos_mel_1_0")}
    assert superseded(before, in_place) == set()
    assert superseded(before, reloaded_whole) == {10}


async def _cancellation_burst(url: str, mel: np.ndarray, calls: int, deadline_s: float) -> List[str]:
    """``calls`` concurrent plain tritonclient calls with a ``deadline_s`` gRPC deadline each."""
    client = aioclient.InferenceServerClient(url)

    async def one() -> str:
        inputs = make_inputs({"mel": mel})
        try:
            await client.infer(Model.VOCOS_MEL, inputs, client_timeout=deadline_s)
            return "ok"
        except Exception as exc:  # the statuses and messages are what the test looks at
            return str(exc)

    try:
        return await asyncio.gather(*(one() for _ in range(calls)))
    finally:
        await client.close()


def test_cancellation_bursts_from_plain_tritonclient_never_reach_or_restart_tritonserver(small_repository, tmp_path,
                                                                                         reference_mel, speech_1s):
    """Bursts of long calls whose gRPC deadlines pass (each one a cancellation at the client) never make
    tritonserver see a cancellation (its 2.51 gRPC frontend can crash on one): the guard answers the
    clients, refuses what is beyond its in-flight bound, and the models skip the work whose deadline
    passed. The same tritonserver process serves on. (The guard's bound is 8 here, below what 40 calls that
    arrive together need: with the default 32, whether calls are refused by it depends on how fast
    tritonserver answers the first ones.)"""
    server = small_server(small_repository, tmp_path, guard_max_in_flight=8).start()
    try:
        _bursts_never_reach_tritonserver(server, reference_mel, speech_1s)
    finally:
        server.stop()


def _anonymous_rss_mb(pid: int) -> float:
    return anonymous_resident_bytes(pid) / 2**20


def _bursts_never_reach_tritonserver(server: TritonServer, reference_mel, speech_1s) -> None:
    pid = server.process.pid
    guard_mb = _anonymous_rss_mb(server.guard.process.pid)
    long_mel = np.zeros((100, 2_800), np.float32)  # about 30 s of audio each
    statuses: List[str] = []
    for _ in range(3):
        statuses += asyncio.run(_cancellation_burst(server.grpc_url, long_mel, calls=40, deadline_s=1.0))
    # calls that could not be in time: their deadline passed (the client went), or the model answered them
    # at once because their forward would have ended after it
    too_late = [s for s in statuses if s.startswith("[StatusCode.DEADLINE_EXCEEDED]") or "deadline would pass" in s]
    assert len(too_late) >= 10, statuses
    # 40 at once is more than the guard lets one model have upstream (8 here): the rest were refused as busy
    refused = [s for s in statuses if "the gRPC guard's limit" in s]
    assert refused and all(s.startswith("[StatusCode.UNAVAILABLE]") for s in refused), statuses
    mel = ref.mel_features(reference_mel, speech_1s)
    # the next call is answered: through the SDK, which retries a full queue (right after a burst,
    # tritonserver's queue still holds expired work until the forwards in progress end; make overload
    # measures that single-attempt wait, see docs/performance.md)
    with VocosClient(server.grpc_url, timeout=60) as client:
        waveform = client.synthesize(mel=mel)
    assert ref.max_error(waveform, ref.mel_decode(reference_mel, mel)) <= 1e-4
    assert server.process.pid == pid and server.process.poll() is None and not server.supervisor.restarts
    # the guard keeps what the burst's calls freed for the next ones (no page faults per request) and gives
    # it back after the spell (docs/architecture.md, "The gRPC guard")
    deadline = time.monotonic() + 15
    while _anonymous_rss_mb(server.guard.process.pid) > guard_mb + 16 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _anonymous_rss_mb(server.guard.process.pid) <= guard_mb + 16, (guard_mb, "MB before the bursts")
    log = server.log_file.read_text(errors="replace")
    assert "Signal (11)" not in log
    # no cancellation reached tritonserver: no request was seen cancelled by its client
    assert "cancelled by its client" not in log
    # and work nobody waited for was skipped by its deadline instead of computed: already passed, passing
    # before its forward would end, or refused by tritonserver's queue
    assert any(words in log for words in ("deadline had passed", "deadline would pass", "Request timeout expired"))


def test_stop_is_bounded_fresh(server):
    assert stop_and_check(server) <= server.options.exit_timeout_s + STOP_SLACK_S


def test_stop_is_bounded_after_a_stub_was_replaced(server):
    (victim, *_) = [pid for pid, model in python_stubs(server.process.pid).items() if model == Model.VOCOS_MEL]
    os.kill(victim, signal.SIGKILL)
    repaired = metrics.settled(lambda: list(server.watchdog.restarts), bool, timeout_s=60)
    assert [m for m, _ in repaired] == [Model.VOCOS_MEL]
    # (a dead stub made tritonserver 2.51 wait its whole exit timeout, 30 s by default)
    assert stop_and_check(server) <= server.options.exit_timeout_s + STOP_SLACK_S


def test_stop_is_bounded_with_streams_open(server, reference_mel, speech_1s):
    mel = ref.mel_features(reference_mel, speech_1s)
    client = VocosClient(server.grpc_url)
    streams = [client.stream(mel=_endless(mel)) for _ in range(3)]
    for stream in streams:
        next(stream)
    try:
        assert stop_and_check(server) <= server.options.exit_timeout_s + STOP_SLACK_S
    finally:
        client.close()


def _endless(mel: np.ndarray) -> Iterator[np.ndarray]:
    """Chunks of a stream that never ends (a TTS stack that hangs mid-sentence)."""
    yield mel[:, :60]
    while True:
        time.sleep(0.05)
        yield mel[:, :2]


def test_stop_is_bounded_under_load(server, reference_mel, speech_1s):
    long_mel = np.zeros((100, 1_000), np.float32)
    stop = threading.Event()
    done: Dict[str, int] = {"ok": 0, "error": 0}

    def load() -> None:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            while not stop.is_set():
                try:
                    client.infer(Model.VOCOS_MEL, make_inputs({"mel": long_mel}), client_timeout=30)
                    done["ok"] += 1
                except Exception:  # the server goes away under the callers: errors are expected
                    done["error"] += 1

    callers = [threading.Thread(target=load) for _ in range(6)]
    for caller in callers:
        caller.start()
    busy: Callable[[], int] = lambda: done["ok"]  # noqa: E731
    metrics.settled(busy, lambda ok: ok >= 3, timeout_s=60)
    try:
        assert stop_and_check(server) <= server.options.exit_timeout_s + STOP_SLACK_S
    finally:
        stop.set()
        for caller in callers:
            caller.join(timeout=60)
