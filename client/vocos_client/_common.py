"""What the sync and asyncio clients share: options, channel arguments, the retry schedule, results."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from os import PathLike
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from vocos_triton.contract import DEFAULT_GEOMETRY, DEFAULT_VARIANT, Access, Geometry, split_model_name

from ._errors import InvalidInputError, ServerError, ServerUnavailableError, VocosError
from ._inputs import MODELS, OUTPUT, SAMPLE_RATE, Limits, Request, call_kind, prepare
from ._variants import GeometryCache, is_missing_model, normalize_variant

log = logging.getLogger("vocos_client")

PathOrStr = Union[str, "PathLike[str]"]
#: A batch item: a mel array (``(C, T)``) or a dict of :meth:`VocosClient.synthesize` keywords (``variant``
#: included).
BatchItem = Union[np.ndarray, Sequence[Any], Mapping[str, Any]]

_INT32_MAX = 2**31 - 1
#: with ``retries=None`` and no deadline (``timeout=None``), a call still stops retrying after this long
UNBOUNDED_RETRY_WINDOW_S = 60.0
#: the longest sleep between two attempts (the backoff doubles up to it)
MAX_BACKOFF_S = 2.0

ProgressCallback = Callable[[int], None]

#: What ``url`` may be: ``"host:port"``, several (``"h1:8001,h2:8001"`` or a list), or a gRPC target URI
#: (``"dns:///vocos-grpc.default.svc:8001"``, ``"ipv4:10.0.0.1:8001,10.0.0.2:8001"``).
Endpoints = Union[str, Sequence[str]]


# ---------------------------------------------------------------------------------------------------
# Several replicas: gRPC's own name resolution and round_robin policy, no balancer of ours.
#
# A gRPC channel is one HTTP/2 connection per address; with the default ``pick_first`` policy every
# call of a client goes to one server (a Kubernetes ClusterIP Service balances connections, so it
# changes nothing). With ``round_robin`` the channel connects to every address its resolver returns
# and sends each call to the next one whose connection is READY: a replica that is gone (connection
# refused or reset) or still loading its models (tritonserver opens its ports only once they are
# loaded) gets no calls, so the retry of a call that failed ``UNAVAILABLE`` on a dying replica lands
# on another one, and the channel keeps reconnecting to the missing one in the background. A stream
# is a single gRPC call, so all of its messages stay on the replica it started on.
#
# No client-side health checks (service config ``healthCheckConfig``): tritonserver 2.51 answers
# ``grpc.health.v1.Health/Check`` but not ``Watch``, which gRPC's health checking uses, and gRPC then
# logs an error per connection and treats the server as healthy anyway.

#: gRPC resolver schemes a target may start with (grpc/doc/naming.md); such a target is used as is.
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")

#: round_robin over every resolved address
BALANCED_SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}]}


def _split_endpoint(endpoint: str) -> Tuple[str, int]:
    host, sep, port = endpoint.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"url: expected HOST:PORT, got {endpoint!r}")
    return host, int(port)


def grpc_target(url: Endpoints) -> str:
    """The gRPC channel target for one endpoint, several, or a gRPC target URI.

    ``"host:port"`` stays as it is. Several endpoints (a list, or comma-separated) become one
    ``ipv4:``/``ipv6:`` target with every address, host names resolved once, here (use
    ``dns:///name:port`` for a name whose addresses change, e.g. a Kubernetes headless Service: gRPC's
    DNS resolver then re-resolves it when a connection drops). Target URIs pass through unchanged.
    With TLS, prefer ``dns:///name:port``: the certificate is checked against the target's name, and
    an address list has none.
    """
    if isinstance(url, str):
        text = url.strip()
        if text.startswith(_TARGET_SCHEMES):
            return text
        endpoints = [part for part in (p.strip() for p in text.split(",")) if part]
    else:
        endpoints = [str(part).strip() for part in url if str(part).strip()]
    if not endpoints:
        raise ValueError("url: expected HOST:PORT, several of them, or a gRPC target such as dns:///name:port")
    for endpoint in endpoints:
        if endpoint.startswith(("http://", "https://", "grpc://")) or endpoint.startswith(_TARGET_SCHEMES):
            raise ValueError(f"url: expected HOST:PORT of Triton's gRPC endpoint (e.g. localhost:8001), "
                             f"got {endpoint!r}")
    if len(endpoints) == 1:
        _split_endpoint(endpoints[0])
        return endpoints[0]
    families: Dict[int, List[str]] = {4: [], 6: []}
    for endpoint in endpoints:
        host, port = _split_endpoint(endpoint)
        for address in _resolve(host, port):
            family = ipaddress.ip_address(address).version
            entry = f"[{address}]:{port}" if family == 6 else f"{address}:{port}"
            if entry not in families[family]:
                families[family].append(entry)
    # one target holds one address family; IPv4 where any endpoint has one (it is what servers bind)
    family = 4 if families[4] else 6
    return f"ipv{family}:" + ",".join(families[family])


def _resolve(host: str, port: int) -> List[str]:
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"url: cannot resolve {host!r} ({exc.strerror})") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_balanced(target: str) -> bool:
    """Whether ``target`` may name several servers (a resolver URI or an address list)."""
    return target.startswith(_TARGET_SCHEMES)


def balancing_channel_args(target: str) -> List[Tuple[str, Any]]:
    """Channel arguments that spread calls over every address of ``target`` (none for one ``host:port``)."""
    if not is_balanced(target):
        return []
    return [("grpc.service_config", json.dumps(BALANCED_SERVICE_CONFIG))]


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
    retries: Optional[int]  # None: as many as the deadline allows
    backoff: float
    ssl: bool
    root_certificates: Optional[str]
    private_key: Optional[str]
    certificate_chain: Optional[str]
    validate: bool
    limits: Limits
    api_key: Optional[str] = None

    @classmethod
    def make(cls, url: Endpoints, *, timeout: Optional[float], retries: Optional[int], backoff: float, ssl: bool,
             root_certificates: Optional[PathOrStr], private_key: Optional[PathOrStr],
             certificate_chain: Optional[PathOrStr], validate: bool, max_seconds: float,
             api_key: Optional[str] = None) -> Options:
        if retries is not None and retries < 0:
            raise ValueError(f"retries: expected >= 0 or None, got {retries}")
        if backoff < 0:
            raise ValueError(f"backoff: expected >= 0 seconds, got {backoff}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds or None, got {timeout}")
        url = grpc_target(url)

        def path(value: Optional[PathOrStr]) -> Optional[str]:
            # tritonclient reads these files when the channel is made (the asyncio client: on first use),
            # so a wrong path is reported here, where it was given.
            if value is None:
                return None
            if not os.path.isfile(value):
                raise FileNotFoundError(f"TLS file not found: {os.fspath(value)}")
            return os.fspath(value)

        return cls(url, timeout, None if retries is None else int(retries), float(backoff), bool(ssl),
                   path(root_certificates), path(private_key), path(certificate_chain), bool(validate),
                   Limits(max_seconds), checked_api_key(api_key))

    def headers(self) -> Dict[str, str]:
        """gRPC metadata every call sends (``headers=`` of tritonclient's methods, streams included):
        the API key, when there is one."""
        return {Access.grpc_header(Access.API_KEY): self.api_key} if self.api_key else {}

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
        ] + balancing_channel_args(self.url)
        return dict(url=self.url, ssl=self.ssl, root_certificates=self.root_certificates,
                    private_key=self.private_key, certificate_chain=self.certificate_chain,
                    channel_args=channel_args)

    def prepare(self, **kwargs: Any) -> Request:
        return prepare(limits=self.limits, validate=self.validate, **kwargs)


def checked_api_key(value: Optional[str]) -> Optional[str]:
    """The API key as sent (surrounding whitespace, e.g. a file's newline, dropped); ``None`` for none."""
    if value is None:
        return None
    value = value.strip()
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("api_key: expected a non-empty printable string without spaces")
    return value


def read_api_key(path: Optional[PathOrStr] = None) -> Optional[str]:
    """The API key from ``path`` (one line), else from ``$VOCOS_API_KEY``, else ``None``."""
    if path is not None:
        with open(path) as handle:
            return checked_api_key(handle.read())
    return checked_api_key(os.environ[Access.API_KEY_ENV]) if os.environ.get(Access.API_KEY_ENV) else None


#: How much sooner than the gRPC deadline the server's request timeout fires (at most; a tenth of the
#: time left when that is less): a queued request the caller would give up on is refused by the server
#: first, so the client seldom has to cancel. tritonserver 2.51 can crash on a cancellation that races
#: the request's completion (triton-inference-server/server#7368, fixed in 2.53).
SERVER_TIMEOUT_LEAD_S = 0.25


def request_timeout_us(remaining_s: Optional[float]) -> Optional[int]:
    """The call's remaining time as Triton's request timeout (microseconds; ``None``: the server's default).

    Sent with each attempt, it makes the server drop the request from its queue once the caller has
    stopped waiting (an ensemble passes it on to its steps), instead of computing it for nobody; it
    fires :data:`SERVER_TIMEOUT_LEAD_S` (or a tenth of ``remaining_s``) before the gRPC deadline.
    """
    if remaining_s is None:
        return None
    return max(1, int((remaining_s - min(SERVER_TIMEOUT_LEAD_S, remaining_s / 10)) * 1e6))


class ClientBase:
    """What both clients share before they talk: the validated options, ``url``, ``sample_rate``, repr.

    The arguments are documented on :class:`vocos_client.VocosClient`; each client sets up its own
    transport in :meth:`_open`.
    """

    #: The default variant's nominal sample rate (24000 Hz, the charactr checkpoints'), kept for
    #: compatibility. What a variant really returns is what the server publishes: :meth:`sample_rate_of`.
    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        url: Endpoints = "localhost:8001",
        *,
        timeout: Optional[float] = 60.0,
        retries: Optional[int] = None,
        backoff: float = 0.2,
        ssl: bool = False,
        root_certificates: Optional[PathOrStr] = None,
        private_key: Optional[PathOrStr] = None,
        certificate_chain: Optional[PathOrStr] = None,
        max_seconds: float = 60.0,
        validate: bool = True,
        api_key: Optional[str] = None,
    ) -> None:
        self._options = Options.make(url, timeout=timeout, retries=retries, backoff=backoff, ssl=ssl,
                                     root_certificates=root_certificates, private_key=private_key,
                                     certificate_chain=certificate_chain, validate=validate,
                                     max_seconds=max_seconds, api_key=api_key)
        #: geometries learnt from the server, per (variant, kind)
        self._geometries = GeometryCache()
        self._open()

    def _open(self) -> None:
        """Set up the client's transport state (called once, at the end of ``__init__``)."""

    def _refused(self, request: Request, error: InvalidInputError) -> None:
        """The server refused a request the local checks passed: the geometry learnt for its variant may
        be stale (the server was rebuilt), so it is asked again on the next call. The error is raised as is."""
        if error.status is not None and self._options.validate:
            self._geometries.forget(split_model_name(request.model)[1])

    @property
    def url(self) -> str:
        return self._options.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, timeout={self._options.timeout}, retries={self._options.retries})"


class Attempts:
    """The retry schedule of one call: a deadline over all attempts, exponential backoff with jitter.

    Only ``UNAVAILABLE`` is retried (no connection, server or model not ready, server busy): synthesis
    has no state, so resending a request is safe. ``INVALID_ARGUMENT`` would fail the same way again,
    and ``DEADLINE_EXCEEDED`` means the time is spent. With ``retries=None`` (the default) the deadline
    alone bounds the retries: a stub reload takes seconds, and a count of retries runs out first.
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
        #: the error that used up the retries before the call was sent (a geometry lookup that fell back)
        self.exhausted: Optional[ServerUnavailableError] = None

    def raise_if_exhausted(self) -> None:
        """Raise what :meth:`give_up` makes of the error that already used up this call's retries."""
        if self.exhausted is not None:
            raise self.give_up(self.exhausted) from self.exhausted

    def remaining(self) -> Optional[float]:
        """Seconds left for the next attempt (its gRPC deadline), ``None`` for no limit."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 1e-3)

    def next_delay(self, error: ServerUnavailableError) -> Optional[float]:
        """Seconds to sleep before retrying after ``error``, or ``None`` when the call must give up."""
        self.attempt += 1
        if self.options.retries is not None and self.attempt > self.options.retries:
            return None
        delay = retry_delay(self.options.backoff, self.attempt)
        deadline = self.deadline
        if deadline is None and self.options.retries is None:
            deadline = self.start + UNBOUNDED_RETRY_WINDOW_S
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        log.warning("%s: server unavailable at %s (%s); retry %d%s in %.2f s", self.what, self.options.url,
                    error.message, self.attempt, "" if self.options.retries is None else f" of {self.options.retries}",
                    delay)
        return delay

    def request_timeout_us(self) -> Optional[int]:
        """The next attempt's deadline as Triton's request timeout (see :func:`request_timeout_us`)."""
        return request_timeout_us(None if self.deadline is None else self.remaining())

    def give_up(self, error: ServerUnavailableError) -> ServerUnavailableError:
        """The error to raise after the last attempt: the server's message plus what was tried."""
        tries = self.attempt  # next_delay counted every failed attempt, the last one included
        elapsed = time.monotonic() - self.start
        final = type(error)(  # a ServerBusyError stays one
            f"{error.message} ({self.options.url}; {tries} attempt{'s' if tries != 1 else ''} in {elapsed:.1f} s)",
            status=error.status, server_message=error.server_message)
        final.attempts = tries
        final.__cause__ = error.__cause__ or error
        return final


def retry_delay(backoff: float, attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): ``backoff`` doubling up to :data:`MAX_BACKOFF_S`,
    ±20 % jitter so that clients refused together do not come back together."""
    return min(backoff * (2 ** min(attempt - 1, 30)), max(MAX_BACKOFF_S, backoff)) * random.uniform(0.8, 1.2)


def waveform(result: Any, model: str) -> np.ndarray:
    """The (samples,) float32 waveform of a one-item response."""
    array = result.as_numpy(OUTPUT)
    if array is None or array.ndim != 2 or array.shape[0] != 1:
        shape = None if array is None else tuple(array.shape)
        raise ServerError(f"{model}: expected output {OUTPUT!r} of shape (1, samples), got {shape}")
    return np.ascontiguousarray(array[0], dtype=np.float32)


#: the keys a batch item (a dict) may have
BATCH_KEYS = ("mel", "audio", "sample_rate", "bandwidth", "codes", "variant")


def batch_kwargs(item: BatchItem) -> Dict[str, Any]:
    """A batch item as ``synthesize`` keywords: a mapping as is, anything else as ``mel=``."""
    if isinstance(item, Mapping):
        unknown = set(item) - set(BATCH_KEYS)
        if unknown:
            raise InvalidInputError(f"unexpected keys {sorted(unknown)}; expected {', '.join(BATCH_KEYS)}")
        return dict(item)
    return {"mel": item}


@dataclass(frozen=True)
class Call:
    """A ``synthesize`` call checked at the call level: its keywords (``variant`` apart), the variant's name
    and the kind of vocoder it needs (so the geometry to look up)."""

    kwargs: Dict[str, Any]
    variant: str
    kind: str

    @property
    def key(self) -> Tuple[str, str]:
        return self.variant, self.kind

    @classmethod
    def make(cls, variant: Optional[str] = None, **kwargs: Any) -> Call:
        """:class:`InvalidInputError` for a malformed call (not one input, a bad variant name)."""
        kind = call_kind(mel=kwargs.get("mel"), audio=kwargs.get("audio"), codes=kwargs.get("codes"),
                         bandwidth=kwargs.get("bandwidth"))
        return cls(kwargs, normalize_variant(variant), kind)

    def prepare(self, options: Options, geometry: Geometry) -> Request:
        return options.prepare(geometry=geometry, variant=self.variant, **self.kwargs)


def batch_calls(items: Sequence[BatchItem], variant: Optional[str] = None) -> List[Union[Call, VocosError]]:
    """Each item as a :class:`Call` (its own ``"variant"`` unless ``None``, else ``variant``), or its error
    (``item 3: ...``)."""
    calls: List[Union[Call, VocosError]] = []
    for index, item in enumerate(items):
        try:
            kwargs = batch_kwargs(item)
            own = kwargs.pop("variant", None)
            calls.append(Call.make(variant if own is None else own, **kwargs))
        except VocosError as exc:
            calls.append(exc.for_item(index))
    return calls


def geometry_keys(calls: Sequence[Union[Call, VocosError]]) -> List[Tuple[str, str]]:
    """The (variant, kind) pairs whose geometry the calls need, each once, in order."""
    return list(dict.fromkeys(call.key for call in calls if isinstance(call, Call)))


def prepare_batch(options: Options, calls: Sequence[Union[Call, VocosError]],
                  geometries: Mapping[Tuple[str, str], Union[Geometry, VocosError]],
                  return_exceptions: bool) -> List[Union[Request, VocosError]]:
    """Prepare every item before anything is sent, with the geometries looked up for the calls (or the error
    of that lookup); errors name the item (``item 3: mel: ...``). Unless ``return_exceptions``, the lowest
    failing item's error is raised."""
    prepared: List[Union[Request, VocosError]] = []
    for index, call in enumerate(calls):
        if isinstance(call, Call):
            try:
                geometry = geometries[call.key]
                if isinstance(geometry, VocosError):
                    raise geometry
                prepared.append(call.prepare(options, geometry))
                continue
            except VocosError as exc:
                call = exc.for_item(index)
        if not return_exceptions:  # in input order: the lowest failing item wins
            raise call from call.__cause__
        prepared.append(call)
    return prepared


# -- geometry lookups ----------------------------------------------------------------------------------
#: what a failed geometry lookup means (:func:`lookup_failure`)
RETRY, MISSING = "retry", "missing"


def lookup_failure(variant: str, kind: str, error: VocosError) -> Union[Geometry, str]:
    """What a failed request for the config of a variant's vocoder means.

    ``UNAVAILABLE`` (no connection, a replica shutting down, a model reloading): :data:`RETRY`, under the call's
    :class:`Attempts` (with several replicas the retry goes to another one); when they run out,
    :func:`lookup_exhausted`. Otherwise, for the default variant: its charactr geometry
    (:data:`~vocos_triton.contract.DEFAULT_GEOMETRY`; an older server publishes none), not kept, so the next call
    asks again. For a named variant: :data:`MISSING` (the server has no such model), or ``error`` to raise.
    """
    if isinstance(error, ServerUnavailableError):
        return RETRY
    if variant == DEFAULT_VARIANT:
        return default_geometry(kind, error)
    if is_missing_model(error):
        return MISSING
    raise error


def lookup_exhausted(variant: str, kind: str, error: ServerUnavailableError, attempts: Attempts) -> Geometry:
    """The retries of a geometry lookup ran out: the default variant goes on with its charactr geometry (so a
    bad input is still reported as such, and the call itself then meets the server's state); a named variant's
    call fails as unavailable."""
    if variant == DEFAULT_VARIANT:
        attempts.exhausted = error  # the call is validated with the fallback, then fails as unavailable unsent
        return default_geometry(kind, error)
    raise attempts.give_up(error) from error


def default_geometry(kind: str, error: VocosError) -> Geometry:
    log.debug("no geometry from the server for the default %s vocoder (%s); using %s", kind, error.message,
              DEFAULT_GEOMETRY[kind].describe())
    return DEFAULT_GEOMETRY[kind]


ENTRY_MODELS: Tuple[str, ...] = tuple(MODELS.values())
