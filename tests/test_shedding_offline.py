"""How the SDK reads a shedding or locked-down server's answers, and its deadline-bounded retry schedule
(no server: tritonserver 2.51's messages as they arrive; the live checks are in test_exposure.py,
test_stub_recovery.py and test_overload_smoke.py)."""
from __future__ import annotations

import time

import pytest
from tritonclient.utils import InferenceServerException

from vocos_client import (
    DeadlineExceededError,
    PermissionDeniedError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    VocosClient,
)
from vocos_client._common import MAX_BACKOFF_S, Attempts, request_timeout_us, retry_delay
from vocos_client._errors import from_triton
from vocos_triton.contract import Access
from vocos_triton.launcher.server import free_port

UNAVAILABLE = "StatusCode.UNAVAILABLE"


@pytest.mark.parametrize("message, kind", [
    ("[request id: <id_unknown>] Exceeds maximum queue size", ServerBusyError),
    ("in ensemble 'resynthesize_mel', [request id: <id_unknown>] Exceeds maximum queue size", ServerBusyError),
    ("[request id: <id_unknown>] Request timeout expired", DeadlineExceededError),
    ("This protocol is restricted, expecting header 'triton-grpc-protocol-vocos-api-key'", PermissionDeniedError),
    ("failed to connect to all addresses", ServerUnavailableError),
])
def test_unavailable_answers_are_told_apart(message, kind):
    error = from_triton(InferenceServerException(message, status=UNAVAILABLE))
    # a queue timeout is the caller's deadline spent: reported as DEADLINE_EXCEEDED, the server's words kept
    status = "StatusCode.DEADLINE_EXCEEDED" if kind is DeadlineExceededError else UNAVAILABLE
    assert type(error) is kind and error.status == status and error.server_message == message
    assert isinstance(error, ServerUnavailableError) == (kind in (ServerBusyError, ServerUnavailableError))


def test_giving_up_keeps_the_kind_of_unavailable():
    with VocosClient(f"127.0.0.1:{free_port()}", timeout=5) as client:
        attempts = Attempts(client._options, None, "test")
        busy = from_triton(InferenceServerException("Exceeds maximum queue size", status=UNAVAILABLE))
        attempts.next_delay(busy)
        final = attempts.give_up(busy)
    assert type(final) is ServerBusyError and final.attempts == 1 and "server busy" in final.message


def test_busy_message_says_so_and_unknown_model_is_a_server_error():
    busy = from_triton(InferenceServerException("Exceeds maximum queue size", status=UNAVAILABLE))
    assert busy.message.startswith("server busy: ")
    missing = from_triton(InferenceServerException("Request for unknown model: 'x' is not found",
                                                   status="StatusCode.NOT_FOUND"))
    assert type(missing) is ServerError


def test_retries_default_to_the_deadline_not_a_count():
    with VocosClient(f"127.0.0.1:{free_port()}", timeout=30) as client:
        attempts = Attempts(client._options, None, "test")
        error = ServerUnavailableError("down")
        delays = [attempts.next_delay(error) for _ in range(12)]
    assert all(d is not None for d in delays)  # 12 retries fit in 30 s: the backoff is capped
    assert max(delays) <= MAX_BACKOFF_S * 1.2 and sum(delays) < 30
    with VocosClient(f"127.0.0.1:{free_port()}", timeout=1.0) as client:
        attempts = Attempts(client._options, None, "test")
        count = 0
        while attempts.next_delay(ServerUnavailableError("down")) is not None:
            count += 1
            assert count < 10
    assert retry_delay(0.2, 1) <= 0.24 and retry_delay(0.2, 40) <= MAX_BACKOFF_S * 1.2


def test_deadline_goes_out_as_the_request_timeout():
    assert request_timeout_us(None) is None and request_timeout_us(0) == 1
    # the server's timeout fires first: 0.25 s before a long deadline, a tenth of a short one
    assert request_timeout_us(10.0) == 9_750_000 and request_timeout_us(1.5) == 1_350_000
    with VocosClient(f"127.0.0.1:{free_port()}", timeout=2.0) as client:
        attempts = Attempts(client._options, None, "test")
        time.sleep(0.1)
        assert 1_000_000 < attempts.request_timeout_us() <= 1_900_000
    with VocosClient(f"127.0.0.1:{free_port()}", timeout=None) as client:
        assert Attempts(client._options, None, "test").request_timeout_us() is None


def test_api_key_goes_out_as_grpc_metadata(monkeypatch, tmp_path):
    from vocos_client._common import read_api_key

    with VocosClient(f"127.0.0.1:{free_port()}", api_key=" key-0123456789\n") as client:
        assert client._options.headers() == {"triton-grpc-protocol-" + Access.API_KEY: "key-0123456789"}
    with VocosClient(f"127.0.0.1:{free_port()}") as client:
        assert client._options.headers() == {}
    with pytest.raises(ValueError, match="api_key"):
        VocosClient(api_key="two words")
    monkeypatch.setenv(Access.API_KEY_ENV, "from-env-0123456789")
    assert read_api_key() == "from-env-0123456789"
    (tmp_path / "k").write_text("from-file-0123456789\n")
    assert read_api_key(tmp_path / "k") == "from-file-0123456789"
    assert "from-file" not in repr(VocosClient(f"127.0.0.1:{free_port()}", api_key="from-file-0123456789"))
