"""What the sync and asyncio clients share: options, channel arguments, the retry schedule, results."""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from os import PathLike
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._errors import InvalidInputError, ServerError, ServerUnavailableError, VocosError
from ._inputs import MODELS, OUTPUT, SAMPLE_RATE, Limits, Request, prepare

log = logging.getLogger("vocos_client")

PathOrStr = Union[str, "PathLike[str]"]
#: A batch item: a mel array (``(100, T)``) or a dict of :meth:`VocosClient.synthesize` keywords.
BatchItem = Union[np.ndarray, Sequence[Any], Mapping[str, Any]]

_INT32_MAX = 2**31 - 1

ProgressCallback = Callable[[int], None]


def triton_inputs(module: Any, request: Request) -> List[Any]:
    """``InferInput`` objects (of ``tritonclient.grpc`` or its ``aio`` twin) with the batch dimension."""
    made = []
    for name, value in request.batched().items():
        dtype = module.np_to_triton_dtype(value.dtype)
        if dtype is None:  # only reachable with validate=False: validation rejects such dtypes first
            raise InvalidInputError(f"{name}: dtype {value.dtype.name} has no Triton equivalent", tensor=name)
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        made.append(tensor)
    return made


@dataclass(frozen=True)
class Options:
    """Connection options of a client (see :class:`vocos_client.VocosClient` for their meaning)."""

    url: str
    timeout: Optional[float]
    retries: int
    backoff: float
    ssl: bool
    root_certificates: Optional[str]
    private_key: Optional[str]
    certificate_chain: Optional[str]
    validate: bool
    limits: Limits

    @classmethod
    def make(cls, url: str, *, timeout: Optional[float], retries: int, backoff: float, ssl: bool,
             root_certificates: Optional[PathOrStr], private_key: Optional[PathOrStr],
             certificate_chain: Optional[PathOrStr], validate: bool, max_seconds: float) -> Options:
        if retries < 0:
            raise ValueError(f"retries: expected >= 0, got {retries}")
        if backoff < 0:
            raise ValueError(f"backoff: expected >= 0 seconds, got {backoff}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds or None, got {timeout}")
        if url.startswith(("http://", "https://", "grpc://")):
            raise ValueError(f"url: expected HOST:PORT of Triton's gRPC endpoint (e.g. localhost:8001), got {url!r}")

        def path(value: Optional[PathOrStr]) -> Optional[str]:
            # tritonclient reads these files when the channel is made (the asyncio client: on first use),
            # so a wrong path is reported here, where it was given.
            if value is None:
                return None
            if not os.path.isfile(value):
                raise FileNotFoundError(f"TLS file not found: {os.fspath(value)}")
            return os.fspath(value)

        return cls(url, timeout, int(retries), float(backoff), bool(ssl), path(root_certificates),
                   path(private_key), path(certificate_chain), bool(validate), Limits(max_seconds))

    def client_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``tritonclient.grpc[.aio].InferenceServerClient``."""
        # tritonclient's defaults (no message size limit, keepalive off), plus a reconnect backoff that
        # follows ours: gRPC fails calls at once while a channel waits to reconnect (1 s at first by
        # default), so without this the first retries would never reach a server that came back.
        reconnect_ms = max(100, int(self.backoff * 1000))
        channel_args: List[Tuple[str, Any]] = [
            ("grpc.max_send_message_length", _INT32_MAX),
            ("grpc.max_receive_message_length", _INT32_MAX),
            ("grpc.keepalive_time_ms", _INT32_MAX),
            ("grpc.keepalive_timeout_ms", 20000),
            ("grpc.keepalive_permit_without_calls", False),
            ("grpc.http2.max_pings_without_data", 2),
            ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
            ("grpc.min_reconnect_backoff_ms", reconnect_ms),
            ("grpc.max_reconnect_backoff_ms", max(reconnect_ms, 5000)),
        ]
        return dict(url=self.url, ssl=self.ssl, root_certificates=self.root_certificates,
                    private_key=self.private_key, certificate_chain=self.certificate_chain,
                    channel_args=channel_args)

    def prepare(self, **kwargs: Any) -> Request:
        return prepare(limits=self.limits, validate=self.validate, **kwargs)


class ClientBase:
    """What both clients share before they talk: the validated options, ``url``, ``sample_rate``, repr.

    The arguments are documented on :class:`vocos_client.VocosClient`; each client sets up its own
    transport in :meth:`_open`.
    """

    #: Sample rate of every waveform the models return.
    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        timeout: Optional[float] = 60.0,
        retries: int = 3,
        backoff: float = 0.2,
        ssl: bool = False,
        root_certificates: Optional[PathOrStr] = None,
        private_key: Optional[PathOrStr] = None,
        certificate_chain: Optional[PathOrStr] = None,
        max_seconds: float = 60.0,
        validate: bool = True,
    ) -> None:
        self._options = Options.make(url, timeout=timeout, retries=retries, backoff=backoff, ssl=ssl,
                                     root_certificates=root_certificates, private_key=private_key,
                                     certificate_chain=certificate_chain, validate=validate,
                                     max_seconds=max_seconds)
        self._open()

    def _open(self) -> None:
        """Set up the client's transport state (called once, at the end of ``__init__``)."""

    @property
    def url(self) -> str:
        return self._options.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, timeout={self._options.timeout}, retries={self._options.retries})"


class Attempts:
    """The retry schedule of one call: a deadline over all attempts, exponential backoff with jitter.

    Only ``UNAVAILABLE`` is retried (no connection, server or model not ready): synthesis has no state,
    so resending a request is safe. ``INVALID_ARGUMENT`` would fail the same way again, and
    ``DEADLINE_EXCEEDED`` means the time is spent.
    """

    def __init__(self, options: Options, timeout: Optional[float], what: str) -> None:
        self.options = options
        self.what = what
        limit = options.timeout if timeout is None else timeout
        if limit is not None and limit <= 0:
            raise ValueError(f"timeout: expected > 0 seconds or None, got {limit}")
        self.start = time.monotonic()
        self.deadline = None if limit is None else self.start + limit
        self.attempt = 0

    def remaining(self) -> Optional[float]:
        """Seconds left for the next attempt (its gRPC deadline), ``None`` for no limit."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 1e-3)

    def next_delay(self, error: ServerUnavailableError) -> Optional[float]:
        """Seconds to sleep before retrying after ``error``, or ``None`` when the call must give up."""
        self.attempt += 1
        if self.attempt > self.options.retries:
            return None
        delay = self.options.backoff * (2 ** (self.attempt - 1)) * random.uniform(0.8, 1.2)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        log.warning("%s: server unavailable at %s (%s); retry %d of %d in %.2f s", self.what,
                    self.options.url, error.message, self.attempt, self.options.retries, delay)
        return delay

    def give_up(self, error: ServerUnavailableError) -> ServerUnavailableError:
        """The error to raise after the last attempt: the server's message plus what was tried."""
        tries = self.attempt  # next_delay counted every failed attempt, the last one included
        elapsed = time.monotonic() - self.start
        final = ServerUnavailableError(
            f"{error.message} ({self.options.url}; {tries} attempt{'s' if tries != 1 else ''} in {elapsed:.1f} s)",
            status=error.status, server_message=error.server_message)
        final.attempts = tries
        final.__cause__ = error.__cause__ or error
        return final


def waveform(result: Any, model: str) -> np.ndarray:
    """The (samples,) float32 waveform of a one-item response."""
    array = result.as_numpy(OUTPUT)
    if array is None or array.ndim != 2 or array.shape[0] != 1:
        shape = None if array is None else tuple(array.shape)
        raise ServerError(f"{model}: expected output {OUTPUT!r} of shape (1, samples), got {shape}")
    return np.ascontiguousarray(array[0], dtype=np.float32)


def batch_kwargs(item: BatchItem) -> Dict[str, Any]:
    """A batch item as ``synthesize`` keywords: a mapping as is, anything else as ``mel=``."""
    if isinstance(item, Mapping):
        unknown = set(item) - {"mel", "audio", "sample_rate", "bandwidth", "codes"}
        if unknown:
            raise InvalidInputError(f"unexpected keys {sorted(unknown)}; expected mel, audio, sample_rate, "
                                    "bandwidth, codes")
        return dict(item)
    return {"mel": item}


def prepare_batch(options: Options, items: Sequence[BatchItem],
                  return_exceptions: bool) -> List[Union[Request, VocosError]]:
    """Prepare every item before anything is sent; errors name the item (``item 3: mel: ...``)."""
    prepared: List[Union[Request, VocosError]] = []
    for index, item in enumerate(items):
        try:
            prepared.append(options.prepare(**batch_kwargs(item)))
        except VocosError as exc:
            if not return_exceptions:
                raise exc.for_item(index) from exc
            prepared.append(exc.for_item(index))
    return prepared


ENTRY_MODELS: Tuple[str, ...] = tuple(MODELS.values())
