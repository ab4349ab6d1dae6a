"""The gRPC guard: the public gRPC port, in front of tritonserver, so that no client cancellation reaches it.

tritonserver 2.51 can crash (signal 11 in ``pthread_mutex_lock``) when a gRPC inference call is cancelled
while its response completes: a race in its gRPC frontend between the cancellation notification and the
response callback (upstream issues #7368 and #8034, fixed in 2.53 and 2.57; the ``nvidia-pytriton``
wheel bundles 2.51). A client whose deadline passes cancels its call, and so does a server-side deadline
(the ``grpc-timeout`` header): one client with short deadlines could take the server down for everyone.

The guard is a small asyncio gRPC proxy that serves ``inference.GRPCInferenceService`` on the public port
and forwards every call, as raw bytes, to tritonserver on a loopback port. It never cancels a call
upstream:

- **Unary calls** go upstream without the client's deadline. A ``ModelInfer`` whose client set a deadline
  carries it instead as Triton's request ``timeout`` (the queue refuses the request in time, a normal
  answer, not a cancellation) and as the :data:`~vocos_triton.contract.DEADLINE_PARAMETER` request
  parameter, which our models read to skip work nobody waits for any more. When the client cancels or its
  deadline passes, the guard answers it at once and lets the upstream call finish unseen.
- **Streams** (``ModelStreamInfer``): when the client goes, the guard stops sending (half-close) and
  drains what tritonserver still answers; the sequence's state is freed by the sequence batcher's idle
  timeout, as for any abandoned stream.

It also bounds what reaches tritonserver: at most ``--max-in-flight`` inference calls per model (32: what a
model's queue of 16 and two instances of batches of 8 hold) are upstream at once (a call whose deadline
has passed no longer counts: the models skip it); a call beyond that is
refused at once with ``UNAVAILABLE`` "Exceeds maximum queue size" (the SDK's ``ServerBusyError``), as
tritonserver's own full queue would, without tritonserver ever receiving it. Bursts of hundreds of 60 s
requests into the ensembles crashed tritonserver 2.51 (signal 11) whether or not their clients cancelled,
and held gigabytes in flight; the guard keeps them out. Such a call is refused before its request is
parsed (the model's name is the message's first field), and once tritonserver has answered a model's call
with its own full queue, the guard refuses that model's calls itself until tritonserver answers one of
them otherwise: sending a burst's megabytes on only to hear "full" again took the CPU the guard needed.

A call that a dead stub held is not lost: the launcher's watchdog tells the guard (on its stdin) which calls
the stub held, and the guard sends them again and answers with the first copy that succeeds
(vocos_triton.launcher.resend).

Metadata (the API and admin keys) is forwarded, so tritonserver still decides who may do what; TLS, when
configured, ends at the guard (docs/exposure.md). HTTP and metrics stay tritonserver's own.

    python -m vocos_triton.launcher.guard --listen HOST:PORT --upstream 127.0.0.1:PORT [--max-in-flight 32]
        [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Sequence, Set, Tuple

import grpc
from tritonclient.grpc import service_pb2

from ..contract import CALL_PARAMETER, DEADLINE_PARAMETER
from ..serving.allocator import trim_function
from .guard_process import MAX_IN_FLIGHT
from .resend import InferCall, Resender

log = logging.getLogger("vocos_triton.launcher.guard")

SERVICE = "inference.GRPCInferenceService"
INFER = f"/{SERVICE}/ModelInfer"
#: Triton's per-request timeout (µs) in a request's parameters; honoured by a queue policy that allows it
TRITON_TIMEOUT_PARAMETER = "timeout"
#: how long before the client's deadline Triton's queue gives up, so that its refusal reaches the client
QUEUE_MARGIN_S = 0.05
#: an upstream call whose client has gone still gets this long before the guard stops waiting for it; it is
#: only cancelled then (a server hung for minutes), never because a client left
ORPHAN_LIMIT_S = 600.0
#: tritonserver's answer when a model's queue is full
TRITON_QUEUE_FULL = "Exceeds maximum queue size"
#: what a refused call is told: the words of tritonserver's own full queue, which clients already handle
QUEUE_FULL = TRITON_QUEUE_FULL + " (the gRPC guard's limit of calls in flight for {model})"
#: seconds without an inference call in flight after which the guard gives freed memory back
IDLE_TRIM_S = 2.0
#: no limit on message sizes: tritonserver and the models enforce the contract's limits
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
#: the channel to tritonserver reconnects within a second once it is back: gRPC's default backoff grows to
#: 120 s, and after the supervisor had restarted a crashed tritonserver (32.6 s) the guard went on failing
#: every call with "failed to connect" for a while (measured in make overload)
UPSTREAM_OPTIONS = CHANNEL_OPTIONS + [("grpc.initial_reconnect_backoff_ms", 100),
                                      ("grpc.min_reconnect_backoff_ms", 100),
                                      ("grpc.max_reconnect_backoff_ms", 1000)]
#: metadata that belongs to the hop, not to the call
_HOP_METADATA = ("user-agent", "te", "content-type", "host")


def forwarded_metadata(metadata: Optional[Sequence[Tuple[str, Any]]]) -> List[Tuple[str, Any]]:
    """The client's metadata minus what gRPC sets per connection (keys, trace ids and the rest pass)."""
    return [(k, v) for k, v in (metadata or ())
            if not k.startswith((":", "grpc-")) and k not in _HOP_METADATA]


def add_deadline(message: service_pb2.ModelInferRequest, remaining_s: float,
                 now_ns: Optional[int] = None) -> service_pb2.ModelInferRequest:
    """``message`` (changed in place, and returned) carrying the client's deadline: Triton's ``timeout``
    lowered to end :data:`QUEUE_MARGIN_S` before it (a shorter one the client set is kept), and
    :data:`DEADLINE_PARAMETER`, the deadline in ns since the epoch."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    timeout_us = max(1, int((remaining_s - QUEUE_MARGIN_S) * 1e6))
    parameters = message.parameters
    if TRITON_TIMEOUT_PARAMETER in parameters and parameters[TRITON_TIMEOUT_PARAMETER].int64_param > 0:
        timeout_us = min(timeout_us, parameters[TRITON_TIMEOUT_PARAMETER].int64_param)
    parameters[TRITON_TIMEOUT_PARAMETER].int64_param = timeout_us
    parameters[DEADLINE_PARAMETER].int64_param = now_ns + int(remaining_s * 1e9)
    return message


def leading_model_name(request: bytes) -> Optional[str]:
    """The ``model_name`` of a serialized ``ModelInferRequest`` when it is the message's first field, as
    protobuf writes it (field 1, length-delimited: tag byte 0x0A); None otherwise. Reading it costs
    nothing, where parsing a 60 s request copies its 5.8 MB."""
    if len(request) < 2 or request[0] != 0x0A:
        return None
    length, shift, index = 0, 0, 1
    while index < min(len(request), 6):  # a varint of at most 5 bytes
        byte = request[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            end = index + length
            if end > len(request):
                return None
            try:
                return request[index:end].decode("utf-8")
            except UnicodeDecodeError:
                return None
        shift += 7
    return None


class Slot:
    """One call's place in its model's in-flight count; freed once, by whichever comes first."""

    def __init__(self, guard: Guard, model: str) -> None:
        self.guard, self.model, self.held = guard, model, True
        guard.in_flight[model] = guard.in_flight.get(model, 0) + 1

    def free(self) -> None:
        if self.held:
            self.held = False
            self.guard.in_flight[self.model] -= 1


class Guard:
    """Forwards every method of the inference service to ``upstream`` without ever cancelling a call."""

    def __init__(self, upstream: str, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.upstream = upstream
        self.max_in_flight = max_in_flight
        self.in_flight: Dict[str, int] = {}  # model -> inference calls upstream now (their clients may be gone)
        self.refused = 0
        self.channel = grpc.aio.insecure_channel(upstream, options=UPSTREAM_OPTIONS)
        # calls whose client has gone, kept until tritonserver answers them (a task nobody references
        # could be collected mid-flight)
        self.orphans: Set[asyncio.Future] = set()
        self.abandoned = 0  # calls whose client went before tritonserver answered
        self.calls = 0  # calls forwarded (a change tells the idle trim there was work since it last looked)
        self.resender = Resender()  # sends again the calls a dead stub may hold
        # models whose queue tritonserver answered full, until it answers one of their calls otherwise
        self.full: Set[str] = set()

    async def give_back_memory_when_idle(self, every_s: float = IDLE_TRIM_S) -> None:
        """Return freed memory to the OS once no inference call has been in flight for ``every_s``, after
        each spell of calls: collect the finished calls caught in reference cycles (each holds its
        request's bytes until the cyclic collector runs) and ``malloc_trim`` what glibc's arenas keep. A
        burst of 200 x 60 s requests left the guard holding 1.34 GB without either (measured)."""
        trim = trim_function()
        seen = self.calls
        while trim is not None:
            await asyncio.sleep(every_s)
            if self.calls != seen and not any(self.in_flight.values()) and not self.orphans:
                seen = self.calls
                gc.collect()  # finished calls in reference cycles still hold their request's bytes
                trim(0)

    def handler(self) -> grpc.GenericRpcHandler:
        methods: Dict[str, grpc.RpcMethodHandler] = {}
        for method in service_pb2.DESCRIPTOR.services_by_name[SERVICE.split(".")[-1]].methods:
            path = f"/{SERVICE}/{method.name}"
            if method.client_streaming or method.server_streaming:
                methods[method.name] = grpc.stream_stream_rpc_method_handler(self._stream(path))
            else:
                methods[method.name] = grpc.unary_unary_rpc_method_handler(self._unary(path))
        return grpc.method_handlers_generic_handler(SERVICE, methods)


    def _orphan(self, future: asyncio.Future) -> None:
        self.abandoned += 1
        self._keep(future)

    def _keep(self, future: asyncio.Future) -> None:
        """Hold ``future`` until it is done (asyncio keeps no reference to a task)."""
        self.orphans.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: asyncio.Future) -> None:
        self.orphans.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: an error nobody waits for is not worth a warning

    def _unary(self, path: str) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        stub = self.channel.unary_unary(path)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = forwarded_metadata(context.invocation_metadata())
            remaining = context.time_remaining()
            if path == INFER:
                return await self._infer(stub, request, metadata, remaining, context)
            call = asyncio.ensure_future(stub(request, metadata=metadata, timeout=remaining))
            self.calls += 1
            return await self._answer(call, context, lambda: call.done() or self._orphan(call))

        return forward

    async def _infer(self, stub: grpc.aio.UnaryUnaryMultiCallable, request: bytes, metadata: List[Tuple[str, Any]],
                     remaining: Optional[float], context: grpc.aio.ServicerContext) -> bytes:
        """A ModelInfer: refused at the in-flight limit, else sent upstream with the client's deadline as
        Triton's timeout and the models' deadline parameter, and sent again when a dead stub may hold it
        (vocos_triton.launcher.resend)."""
        # A call beyond the bound is refused before its request is parsed: in a burst most calls are,
        # and parsing each one's megabytes was a third of the guard's copies and fresh pages. The parsed
        # name decides (a repeated field 1: the last one counts).
        leading = leading_model_name(request)
        if leading is not None and self._at_limit(leading):
            await self._refuse(context, leading)
        message = service_pb2.ModelInferRequest.FromString(request)
        model = message.model_name
        if self._at_limit(model):
            await self._refuse(context, model)
        if remaining is not None:
            add_deadline(message, remaining)
        number = self.resender.number()
        message.parameters[CALL_PARAMETER].int64_param = number  # the stub that holds it notes it
        request = message.SerializeToString()
        del message
        loop = asyncio.get_running_loop()
        deadline = None if remaining is None else loop.time() + remaining

        def send(copy: int) -> Awaitable[bytes]:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            body = request
            if copy and left is not None:  # a later copy: Triton's timeout is what is left of the deadline
                body = add_deadline(service_pb2.ModelInferRequest.FromString(request), left).SerializeToString()
            # upstream, the deadline is only a bound for a hung server: the guard never cancels a call
            return stub(body, metadata=metadata, timeout=None if left is None else left + ORPHAN_LIMIT_S)

        call = self.resender.start(model, number, len(request), send, deadline)
        self.calls += 1
        # the model's slot frees when the call is answered, or once the deadline has passed (the models
        # then skip it at their next look), not when the client goes (see _abandon)
        slot = Slot(self, model)
        call.answer.add_done_callback(lambda answer: answer.cancelled() or slot.free())
        call.answer.add_done_callback(lambda answer: answer.cancelled() or self._note_queue(model, answer))
        if remaining is not None:
            loop.call_later(remaining, slot.free)
        try:
            return await self._answer(call.answer, context, lambda: self._abandon(call, slot))
        finally:
            for copy in call.pending():  # copies that lost, or whose client went, finish unseen
                self._keep(copy)

    def _at_limit(self, model: str) -> bool:
        """Whether a call to ``model`` is refused now: its bound is reached, or tritonserver said the
        model's queue was full and nothing of it has been answered since (one call still goes up when
        none is in flight, to find out). Sending a burst's 5.8 MB requests on to hear "full" again made
        tritonserver copy them on the core the guard needed to refuse the rest in time."""
        in_flight = self.in_flight.get(model, 0)
        return in_flight >= self.max_in_flight or (model in self.full and in_flight > 0)

    def _note_queue(self, model: str, answer: asyncio.Future) -> None:
        error = answer.exception()
        if (isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
                and TRITON_QUEUE_FULL in (error.details() or "")):
            self.full.add(model)
        else:
            self.full.discard(model)

    async def _refuse(self, context: grpc.aio.ServicerContext, model: str) -> None:
        self.refused += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, QUEUE_FULL.format(model=model))

    def _abandon(self, call: InferCall, slot: Slot) -> None:
        """``call``'s client has gone: no more copies; those out finish unseen, and hold the model's slot
        until they do (or the deadline passes)."""
        if call.answer.done():
            return
        call.answer.cancel()
        self.resender.forget(call)
        self.abandoned += 1
        pending = call.pending()
        if pending:
            asyncio.gather(*pending, return_exceptions=True).add_done_callback(lambda _: slot.free())
        else:
            slot.free()

    async def _answer(self, answer: asyncio.Future, context: grpc.aio.ServicerContext,
                      client_gone: Callable[[], Any]) -> bytes:
        """``answer`` for the client, its error as the client's status; when the client cancels or its
        deadline passes, ``client_gone()`` and the call goes on upstream, unseen."""
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            client_gone()
            raise
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")
            raise  # not reached: abort raises

    def _stream(self, path: str) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        stub = self.channel.stream_stream(path)

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            call = stub(metadata=forwarded_metadata(context.invocation_metadata()))

            async def send() -> None:
                try:
                    async for request in requests:
                        await call.write(request)
                finally:
                    await call.done_writing()

            sender = asyncio.ensure_future(send())
            finished = False
            try:
                async for response in call:
                    yield response
                finished = True
            except grpc.aio.AioRpcError as error:
                finished = True
                await context.abort(error.code(), error.details() or "")
            finally:
                if not finished:  # the client went: half-close upstream and let tritonserver finish
                    sender.cancel()
                    self._orphan(asyncio.ensure_future(self._drain(call)))

        return forward

    @staticmethod
    async def _drain(call: grpc.aio.StreamStreamCall) -> None:
        try:
            await call.done_writing()
        except Exception:  # already half-closed by the sender
            pass
        async for _ in call:
            pass

    async def follow_repairs(self, notices: asyncio.StreamReader) -> None:
        """Read the launcher's notices of stub repairs (JSON lines ``{"event": "repairing" | "repaired",
        "models": [...]}``, from the watchdog) until the launcher closes the pipe."""
        while line := await notices.readline():
            try:
                notice = json.loads(line)
                event, models = notice["event"], [str(m) for m in notice["models"]]
                held = None if notice.get("calls") is None else [int(c) for c in notice["calls"]]
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a notice the guard cannot read: %r", line[:200])
                continue
            if event == "repairing":
                self.resender.repair_started(models, held)
            elif event == "repaired":
                self.resender.repair_ended(models)

    async def close(self, grace_s: float) -> None:
        self.resender.close()
        if self.orphans:
            await asyncio.wait(list(self.orphans), timeout=grace_s)
        await self.channel.close()


async def serve(listen: str, upstream: str, credentials: Optional[grpc.ServerCredentials] = None,
                ready: Optional[Callable[[int], None]] = None, stop: Optional[asyncio.Event] = None,
                max_in_flight: int = MAX_IN_FLIGHT, grace_s: float = 4.0) -> None:
    """Run the guard until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None); then take no new calls
    and give those in flight ``grace_s`` (the launcher's exit timeout) to finish."""
    guard = Guard(upstream, max_in_flight)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((guard.handler(),))
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    trimming = asyncio.ensure_future(guard.give_back_memory_when_idle())
    following = asyncio.ensure_future(guard.follow_repairs(await stdin_reader())) if stdin_is_pipe() else None
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    log.info("gRPC guard on %s -> tritonserver %s", listen, upstream)
    if ready is not None:
        ready(port)
    await stop.wait()
    trimming.cancel()
    if following is not None:
        following.cancel()
    await server.stop(grace=grace_s)
    await guard.close(grace_s=0.5)
    log.info("gRPC guard stopped (%d calls outlived their client, %d refused at the in-flight limit, %d copies "
             "sent again around stub deaths, %d calls answered by one)", guard.abandoned, guard.refused,
             guard.resender.resent, guard.resender.rescued)


def stdin_is_pipe() -> bool:
    """Whether the guard's stdin is a pipe: the launcher's notices of stub repairs come that way."""
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError):
        return False


async def stdin_reader() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def server_credentials(cert: Path, key: Path, ca: Optional[Path]) -> grpc.ServerCredentials:
    """TLS for the public port; mutual when ``ca`` is given (clients must present a certificate it signed)."""
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                       root_certificates=ca.read_bytes() if ca else None,
                                       require_client_auth=ca is not None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT of the public gRPC endpoint")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of tritonserver's gRPC endpoint (loopback)")
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                        help="inference calls one model may have in tritonserver at once; more are refused")
    parser.add_argument("--grace", type=float, default=4.0,
                        help="seconds calls in flight get after SIGTERM (the launcher passes its exit timeout)")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-ca", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    try:
        asyncio.run(serve(args.listen, args.upstream, credentials, max_in_flight=args.max_in_flight,
                          grace_s=args.grace))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
