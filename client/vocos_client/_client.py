"""``VocosClient``: the synchronous client over ``tritonclient.grpc``."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ._common import (
    ENTRY_MODELS,
    Attempts,
    BatchItem,
    ClientBase,
    ProgressCallback,
    prepare_batch,
    triton_inputs,
    waveform,
)
from ._errors import ServerUnavailableError, VocosError, from_triton
from ._inputs import OUTPUT, ArrayLike, Request
from ._stream import ChunkSource, plan, stream

log = logging.getLogger("vocos_client")

class VocosClient(ClientBase):
    """Synthesize 24 kHz speech with the Vocos models on a Triton server (gRPC).

    Args:
        url: ``HOST:PORT`` of Triton's gRPC endpoint; or several replicas, as a list or comma-separated
            (``["h1:8001", "h2:8001"]``), or a gRPC target such as ``dns:///vocos-triton-grpc:8001`` (a
            Kubernetes headless Service). Several addresses get gRPC's round_robin policy: calls are
            spread over the replicas whose connection is up, a retry goes to the next one, and a
            stream stays on the replica it started on (see docs/deployment-k8s.md).
        timeout: seconds one call may take in all, retries and their backoff included (``None``: no limit).
            Each method also takes ``timeout=`` to override it for that call. Running out while the
            server answers raises :class:`DeadlineExceededError`; while it stays unavailable, the
            call stops before a retry would pass the deadline and raises :class:`ServerUnavailableError`.
        retries: how many times a call may be resent after ``UNAVAILABLE`` (never after any other error);
            ``None`` (default): as often as the call's deadline allows (60 s when ``timeout`` is ``None``).
            ``UNAVAILABLE`` covers no connection, a model reloading after its stub died, and a full
            queue (:class:`ServerBusyError`); each attempt carries the time left as Triton's request
            timeout, so the server drops it from its queue when the caller stops waiting.
        backoff: the first retry waits this many seconds, each further one twice as long, up to 2 s (±20 % jitter).
        ssl: use a TLS channel; ``root_certificates`` (PEM file of the CA; default: gRPC's roots),
            ``private_key`` and ``certificate_chain`` (PEM files of a client certificate, for mutual TLS).
        max_seconds: the longest item in seconds of 24 kHz audio; must match the server's ``max_seconds``
            model parameter (60 by default). Longer inputs are rejected, never truncated.
        validate: check inputs against the serving contract before sending (default). ``False`` leaves
            the checks to the server (same messages, one round trip later); meant for tests.
        api_key: the key a server started with ``--api-key-file`` requires for inference (sent as gRPC
            metadata on every call; use TLS so that it does not cross the network in plaintext).
            Without it such a server raises :class:`PermissionDeniedError`.

    Use it as a context manager, or call :meth:`close`. Thread-safe: one client can serve many threads.
    """

    def _open(self) -> None:
        self._client: Optional[grpcclient.InferenceServerClient] = grpcclient.InferenceServerClient(
            **self._options.client_kwargs())
        self._outputs = [grpcclient.InferRequestedOutput(OUTPUT)]
        # Worker pools of synthesize_batch, kept per size: starting 8 threads per call costs about a
        # millisecond, which is a tenth of a 1 s clip's synthesis.
        self._pools: Dict[int, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the gRPC channel; later calls raise :class:`VocosError`. Calling it twice is harmless."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
        with self._pools_lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def _pool(self, workers: int) -> ThreadPoolExecutor:
        with self._pools_lock:
            if workers not in self._pools:
                self._pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vocos-client")
            return self._pools[workers]

    def __enter__(self) -> VocosClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _triton(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            raise VocosError("the client is closed")
        return self._client

    # -- health -----------------------------------------------------------------------------------
    def ready(self, *, models: Optional[Iterable[str]] = None, timeout: Optional[float] = None) -> bool:
        """Whether the server is ready and so are ``models`` (default: the four models ``synthesize`` uses).

        Never raises for an unreachable server (returns ``False``) and never retries: a health
        check should say how things are now. ``timeout`` bounds all checks together.
        """
        client = self._triton()
        attempts = Attempts(self._options, timeout, "ready")
        names = list(ENTRY_MODELS if models is None else models)
        try:
            if not client.is_server_ready(headers=self._options.headers(), client_timeout=attempts.remaining()):
                log.info("server at %s is not ready", self.url)
                return False
            for name in names:
                if not client.is_model_ready(name, headers=self._options.headers(),
                                            client_timeout=attempts.remaining()):
                    log.info("model %s at %s is not ready", name, self.url)
                    return False
        except InferenceServerException as exc:
            log.info("server at %s is not ready: %s", self.url, from_triton(exc))
            return False
        return True

    # -- inference --------------------------------------------------------------------------------
    def synthesize(
        self,
        *,
        mel: Optional[ArrayLike] = None,
        audio: Optional[ArrayLike] = None,
        sample_rate: Optional[int] = None,
        bandwidth: Optional[float] = None,
        codes: Optional[ArrayLike] = None,
        timeout: Optional[float] = None,
    ) -> np.ndarray:
        """One waveform, float32, shape (samples,), at :attr:`sample_rate` (24 kHz). Give exactly one of:

        * ``mel``: (100, T) log-mel features (e.g. from an acoustic model), T >= 2; float dtype or a
          nested list; (1, 100, T) is accepted too. Returns (T - 1) * 256 samples (model ``vocos_mel``).
        * ``audio`` + ``sample_rate``: mono (L,) audio in any float dtype or int8/int16/int32/uint8 PCM,
          resampled to 24 kHz with soxr ("HQ"). Without ``bandwidth`` it is resynthesized through the
          mel path (``resynthesize_mel``; at least 513 samples at 24 kHz), with ``bandwidth`` (kbps:
          1.5, 3, 6 or 12) through EnCodec (``resynthesize_encodec``). Returns about L * 24000 / rate samples.
        * ``codes``: (K, T) EnCodec codes of any integer dtype in [0, 1024), K = 2/4/8/16 for
          1.5/3/6/12 kbps (``bandwidth`` may be left out: it follows from K). Bark's fine tokens are
          (8, T) at 6 kbps. (K, 1, T) and (1, K, T) are accepted too. Returns T * 320 samples.

        Raises:
            InvalidInputError: the input breaks the contract (found locally, or by the server).
            ServerUnavailableError: the server could not be reached after ``retries`` retries.
            DeadlineExceededError: ``timeout`` ran out.
            ServerError: any other server failure.
        """
        request = self._options.prepare(mel=mel, audio=audio, sample_rate=sample_rate, bandwidth=bandwidth,
                                        codes=codes)
        return self._infer(request, timeout)

    def synthesize_batch(
        self,
        items: Sequence[BatchItem],
        *,
        max_concurrency: int = 8,
        timeout: Optional[float] = None,
        return_exceptions: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> List[Union[np.ndarray, VocosError]]:
        """Synthesize many items concurrently so that the server's dynamic batcher batches them.

        Args:
            items: mel arrays (100, T_i), or dicts of :meth:`synthesize` keywords (``{"audio": x,
                "sample_rate": 16000}``, ``{"codes": c}``, ...); kinds may be mixed.
            max_concurrency: requests in flight at once (the models batch up to 8 items).
            timeout: per item, from the moment it is sent (default: the client's ``timeout``).
            return_exceptions: like :func:`asyncio.gather`: put each failed item's exception in its place
                in the result instead of raising.
            progress: called with an item's index as it finishes (in completion order, from a worker thread).

        Returns:
            One float32 (samples,) waveform per item, in input order.

        Raises:
            VocosError: unless ``return_exceptions``, the failure of the lowest-numbered failing item, its
                message prefixed ``item <index>: `` and ``.item`` set. Every item is validated before
                any is sent, so one bad item costs no requests; after a server-side failure, items not
                yet sent are cancelled.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: expected >= 1, got {max_concurrency}")
        prepared = prepare_batch(self._options, items, return_exceptions)
        results: List[Any] = [None] * len(prepared)
        futures: Dict[int, Future] = {}
        workers = max(1, min(max_concurrency, len(prepared)))
        pool = self._pool(workers)
        for index, request in enumerate(prepared):
            if isinstance(request, VocosError):
                results[index] = request
                if progress is not None:
                    progress(index)
                continue
            future = pool.submit(self._infer, request, timeout)
            if progress is not None:
                future.add_done_callback(lambda _, i=index: progress(i))
            futures[index] = future
        for index, future in futures.items():  # input order: the lowest failing index wins
            try:
                results[index] = future.result()
            except VocosError as exc:
                if not return_exceptions:
                    for other in futures.values():
                        other.cancel()
                    raise exc.for_item(index) from exc
                results[index] = exc.for_item(index)
        return results

    def _infer(self, request: Request, timeout: Optional[float]) -> np.ndarray:
        """Send one prepared request, retrying ``UNAVAILABLE`` within the call's deadline."""
        client = self._triton()
        inputs = triton_inputs(grpcclient, request)
        attempts = Attempts(self._options, timeout, request.model)
        while True:
            try:
                result = client.infer(request.model, inputs, outputs=self._outputs,
                                      client_timeout=attempts.remaining(), headers=self._options.headers(),
                                      timeout=attempts.request_timeout_us())
                return waveform(result, request.model)
            except InferenceServerException as exc:
                error = from_triton(exc)
                if not isinstance(error, ServerUnavailableError):
                    raise error from exc
                delay = attempts.next_delay(error)
                if delay is None:
                    raise attempts.give_up(error) from exc
                time.sleep(delay)

    # -- streaming ---------------------------------------------------------------------------------
    def stream(
        self,
        *,
        mel: Optional[ChunkSource] = None,
        codes: Optional[ChunkSource] = None,
        bandwidth: Optional[float] = None,
        chunk_frames: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[np.ndarray]:
        """Stream audio as features arrive: an iterator of float32 (samples,) pieces at 24 kHz, in order.

        The pieces, concatenated, equal :meth:`synthesize` of the concatenated input (exactly: the server
        releases a sample once every frame it depends on has arrived, 29 frames of lookahead). Give one of:

        * ``mel``: (100, T) log-mel frames (models ``vocos_mel_stream``), or
        * ``codes``: (K, T) EnCodec codes, K = 2/4/8/16, with ``bandwidth`` (kbps; inferred from K when
          left out, the same for the whole stream) (``decode_codes_stream``),

        each either as a whole array (numpy, or anything with ``__array__`` such as a CPU torch tensor; sent
        as one request, or in ``chunk_frames`` chunks) or as an iterable of chunks (arrays of T_i >= 1
        frames; a list is a list of chunks), consumed as it is produced: the TTS case, e.g. a
        generator that runs the acoustic model. Each chunk is checked and sent as soon as it comes (a
        background thread pulls the iterable, so producing and receiving overlap; the chunk's last frame
        waits for the next chunk, because the last request must carry a frame and mark the end).

        Closing the iterator early (``break``, ``close()``, an exception in the producer or the caller)
        cancels the gRPC stream, which ends the sequence on the server and frees its state. ``timeout``
        (default: the client's) bounds the whole stream.

        Raises (while iterating):
            InvalidInputError: a chunk breaks the contract (checked locally before it is sent, with the
                server's words, or refused by the server), or the whole stream is longer than
                ``max_seconds`` or shorter than the offline minimum (2 mel frames).
            ServerUnavailableError: the server stayed busy or unreachable at the start of the stream
                (retried with the client's backoff while no audio had come back; never later).
            DeadlineExceededError: ``timeout`` ran out.
            ServerError: any other server failure.
        """
        stream_plan = plan(self._options, mel=mel, codes=codes, bandwidth=bandwidth, chunk_frames=chunk_frames)
        return stream(self._triton(), self._options, stream_plan, timeout)
