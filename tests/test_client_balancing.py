"""Several endpoints in one client: gRPC's round_robin over their addresses, a dead endpoint skipped,
a call refused UNAVAILABLE by one replica retried on another (the real tritonserver of the session).

The multi-replica run with real replicas killed under load, nginx and streams is tests/test_cluster.py.
"""
from __future__ import annotations

import asyncio
import collections
import json
import threading
from concurrent import futures
from typing import Iterator

import grpc
import numpy as np
import pytest

from vocos_client import AsyncVocosClient, VocosClient
from vocos_client._common import BALANCED_SERVICE_CONFIG, balancing_channel_args, grpc_target
from vocos_triton.contract import Model
from vocos_triton.launcher import metrics
from vocos_triton.launcher.server import free_port

MEL = np.random.default_rng(0).standard_normal((100, 30)).astype(np.float32)


def served(triton) -> float:
    return metrics.total(metrics.scrape(triton.metrics_url), "nv_inference_request_success", Model.VOCOS_MEL)


def down_url() -> str:
    return f"127.0.0.1:{free_port()}"


# -- targets -------------------------------------------------------------------------------------------
def test_one_endpoint_stays_as_it_is():
    assert grpc_target("localhost:8001") == "localhost:8001"
    assert balancing_channel_args("localhost:8001") == []  # one server: gRPC's default pick_first


def test_several_endpoints_become_one_address_list():
    assert grpc_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert grpc_target(["localhost:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"  # names resolved once
    assert grpc_target(["127.0.0.1:5", "127.0.0.1:5"]) == "ipv4:127.0.0.1:5"
    assert grpc_target("[::1]:5,[::1]:6") == "ipv6:[::1]:5,[::1]:6"
    [(key, value)] = balancing_channel_args(grpc_target("127.0.0.1:1,127.0.0.1:2"))
    assert key == "grpc.service_config" and json.loads(value) == BALANCED_SERVICE_CONFIG


def test_grpc_target_uris_pass_through():
    for target in ("dns:///vocos-triton-grpc.default.svc.cluster.local:8001", "ipv4:10.0.0.1:8001,10.0.0.2:8001"):
        assert grpc_target(target) == target
        assert balancing_channel_args(target)


@pytest.mark.parametrize("bad", ["", "localhost", "http://localhost:8001", "a:1,http://b:2", "a:x",
                                 ["a:1", "dns:///b:2"]])
def test_bad_targets_are_refused(bad):
    with pytest.raises(ValueError, match="url"):
        VocosClient(bad)


# -- against the session tritonserver ----------------------------------------------------------------------
def test_dead_endpoints_are_skipped(triton):
    """Two of three endpoints refuse connections: no call goes there, even without retries."""
    before = served(triton)
    with VocosClient([down_url(), triton.grpc_url, down_url()], retries=0, timeout=60) as client:
        assert client.url.startswith("ipv4:")
        for _ in range(6):
            assert client.synthesize(mel=MEL).shape == (29 * 256,)
    assert served(triton) - before == 6


def test_async_client_balances_too(triton):
    async def main() -> int:
        async with AsyncVocosClient(f"{down_url()},{triton.grpc_url}", retries=0, timeout=60) as client:
            results = await asyncio.gather(*(client.synthesize(mel=MEL) for _ in range(4)))
        return len(results)

    assert asyncio.run(main()) == 4


class Draining(grpc.GenericRpcHandler):
    """A replica that accepts connections and refuses every call UNAVAILABLE, as a server does while it
    shuts down: the fault to inject, next to the real server."""

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.lock = threading.Lock()

    def service(self, details):
        with self.lock:
            self.calls[details.method] += 1

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica is shutting down")

        return grpc.unary_unary_rpc_method_handler(refuse)


@pytest.fixture()
def draining() -> Iterator[tuple]:
    handler = Draining()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", handler
    server.stop(grace=None)


def test_a_retry_goes_to_another_replica(triton, draining):
    """round_robin alternates between the two; every call refused by the draining one is resent and
    lands on the real server, so all succeed."""
    url, handler = draining
    before = served(triton)
    with VocosClient([url, triton.grpc_url], retries=3, backoff=0.05, timeout=60) as client:
        for _ in range(8):
            assert client.synthesize(mel=MEL).shape == (29 * 256,)
    refused = handler.calls["/inference.GRPCInferenceService/ModelInfer"]
    assert refused >= 1, "round_robin never picked the draining replica"
    assert served(triton) - before == 8
