"""The exception hierarchy of the SDK and the mapping from tritonclient errors onto it.

Every exception carries ``.status``: the gRPC status string the server (or the gRPC runtime) gave,
such as ``"StatusCode.INVALID_ARGUMENT"``, or ``None`` when the error was found locally before any
request was sent. The server's message is kept word for word; local validation uses the same
functions as the server (:mod:`vocos_triton.contract`), so both read e.g.
``mel: expected 100 mel bins, got 80``.
"""
from __future__ import annotations

import copy
import re
from typing import Optional

from tritonclient.utils import InferenceServerException

from vocos_triton.contract import Access, Tensor

__all__ = [
    "VocosError",
    "InvalidInputError",
    "ServerUnavailableError",
    "ServerBusyError",
    "PermissionDeniedError",
    "DeadlineExceededError",
    "ServerError",
]

INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"
UNAVAILABLE = "StatusCode.UNAVAILABLE"
DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"

# The contract's messages start with the tensor's name: "codes: expected values in [0, 1024), ...".
_TENSOR_PREFIX = re.compile(
    "^(" + "|".join(sorted((v for k, v in vars(Tensor).items() if k.isupper()), key=len, reverse=True)) + "): ")
# Triton core's own checks (dtype, shape) quote the input instead: "... for inference input 'mel', ...".
_TENSOR_QUOTED = re.compile(r"input '([A-Za-z_]+)'")
# Routing noise Triton puts before a model's message: "[request id: <id_unknown>] " and, for an error
# in an ensemble step, "in ensemble 'decode_codes', ". Stripped so that the server's message reads
# like the local one; the raw text stays in ``.server_message``.
_TRITON_PREFIXES = re.compile(r"^(?:\[request id: [^\]]*\] )?(?:in ensemble '([^']+)', )?")


class VocosError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        status: gRPC status string (``"StatusCode.UNAVAILABLE"``, ...) or ``None`` for a local error.
        item: index of the failing item in :meth:`~vocos_client.VocosClient.synthesize_batch`, else ``None``.
        server_message: the server's message exactly as received (``None`` for a local error); the
            exception's own message drops Triton's routing prefixes (``in ensemble 'x', ``).
    """

    def __init__(self, message: str, *, status: Optional[str] = None, item: Optional[int] = None,
                 server_message: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.item = item
        self.server_message = server_message

    def __str__(self) -> str:
        return self.message

    def for_item(self, index: int) -> VocosError:
        """A copy whose message names batch item ``index`` (``"item 3: mel: ..."``); ``__cause__`` is self."""
        clone = copy.copy(self)
        clone.message = f"item {index}: {self.message}"
        clone.args = (clone.message,)
        clone.item = index
        clone.__cause__ = self
        return clone


class InvalidInputError(VocosError, ValueError):
    """A request breaks the serving contract (found locally, or ``INVALID_ARGUMENT`` from the server).

    Attributes:
        tensor: the tensor the message is about (``"mel"``, ``"audio"``, ``"codes"``, ``"bandwidth"``,
            ``"sample_rate"``), or ``None`` when the call itself is malformed (e.g. two input kinds).
    """

    def __init__(self, message: str, *, tensor: Optional[str] = None, status: Optional[str] = None,
                 item: Optional[int] = None, server_message: Optional[str] = None) -> None:
        super().__init__(message, status=status, item=item, server_message=server_message)
        self.tensor = tensor


class ServerUnavailableError(VocosError):
    """The server cannot be reached or is not ready (``UNAVAILABLE``), after all retries.

    Attributes:
        attempts: how many requests were tried before giving up (``None`` if not from a retried call).
    """

    attempts: Optional[int] = None


class ServerBusyError(ServerUnavailableError):
    """The server refused the request at once because the model's queue is full (``UNAVAILABLE``);
    retried with backoff within the call's deadline. (A deadline that passed while the request queued
    is a :class:`DeadlineExceededError`.)"""


class PermissionDeniedError(VocosError):
    """The server requires a key this call did not carry (an API key for inference, the admin key for
    the repository API), or carried a wrong one. Never retried. The server's ``UNAVAILABLE`` status
    is kept in ``.status``."""


class DeadlineExceededError(VocosError, TimeoutError):
    """The call's ``timeout`` ran out before the server answered (``DEADLINE_EXCEEDED``)."""


class ServerError(VocosError):
    """Any other server-side failure (``INTERNAL``, ``UNKNOWN``, ``NOT_FOUND``, ``RESOURCE_EXHAUSTED``, ...)."""


def tensor_of(message: str) -> Optional[str]:
    """The tensor a contract or Triton message is about, if it names one."""
    match = _TENSOR_PREFIX.match(message) or _TENSOR_QUOTED.search(message)
    return match.group(1) if match else None


# How tritonserver 2.51 reports a model whose Python-backend stub died (until the server's watchdog
# reloads it) and a model that is being reloaded. Neither request ran, and the model comes back in
# seconds, so both are "unavailable, retry" rather than permanent errors.
_STUB_DIED = re.compile(r"Stub process '[^']+' is not healthy")
_NO_VERSION_LOADED = re.compile(r"Request for unknown model: '[^']+' has no available versions")


# A bounded queue refusing work (tritonserver 2.51's words, code UNAVAILABLE): full (retry later), or
# the request's timeout (the caller's deadline, sent with it) passed while it waited (the time is spent).
_QUEUE_FULL = re.compile(r"Exceeds maximum queue size")
_QUEUE_TIMEOUT = re.compile(r"Request timeout expired")
# A restricted protocol without its header (code UNAVAILABLE too, but retrying cannot help)
_RESTRICTED = re.compile(r"This protocol is restricted, expecting header '([^']+)'")


def _model_restarting(status: Optional[str], message: str) -> bool:
    return (status == "StatusCode.INTERNAL" and bool(_STUB_DIED.search(message))) or (
        status == "StatusCode.NOT_FOUND" and bool(_NO_VERSION_LOADED.search(message)))


def from_triton(exc: InferenceServerException) -> VocosError:
    """Map a tritonclient exception to our hierarchy by its gRPC status, keeping the server's message."""
    status = exc.status()
    raw = exc.message() or str(exc)
    message = _TRITON_PREFIXES.sub("", raw, count=1) or raw
    if status == INVALID_ARGUMENT:
        return InvalidInputError(message, tensor=tensor_of(message), status=status, server_message=raw)
    restricted = _RESTRICTED.search(raw)
    if restricted:
        return PermissionDeniedError(f"the server requires a key (header {restricted.group(1)!r}): pass api_key= "
                                     f"(CLI: --api-key-file or ${Access.API_KEY_ENV}); {message}",
                                     status=status, server_message=raw)
    if _QUEUE_FULL.search(raw):
        return ServerBusyError(f"server busy: {message}", status=status, server_message=raw)
    if _QUEUE_TIMEOUT.search(raw):  # the server said UNAVAILABLE; for the caller the time is spent
        return DeadlineExceededError(f"deadline passed while queued at the server: {message}",
                                     status=DEADLINE_EXCEEDED, server_message=raw)
    if status == UNAVAILABLE or _model_restarting(status, raw):
        return ServerUnavailableError(message, status=status, server_message=raw)
    if status == DEADLINE_EXCEEDED:
        return DeadlineExceededError(message, status=status, server_message=raw)
    return ServerError(message, status=status, server_message=raw)
