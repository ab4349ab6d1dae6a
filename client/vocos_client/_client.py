"""``VocosClient``: the synchronous client over ``tritonclient.grpc``."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from vocos_triton.contract import VOCODERS, Geometry, variant_model

from ._common import (
    ENTRY_MODELS,
    MISSING,
    Attempts,
    BatchItem,
    Call,
    ClientBase,
    ProgressCallback,
    batch_calls,
    geometry_keys,
    lookup_exhausted,
    lookup_failure,
    prepare_batch,
    triton_inputs,
    waveform,
)
from ._errors import InvalidInputError, ServerUnavailableError, VocosError, from_triton
from ._inputs import OUTPUT, ArrayLike, Request
from ._stream import STREAM_MODELS, ChunkSource, check_call, plan_call, stream
from ._variants import (
    Variant,
    check_kind,
    config_parameters,
    configs_to_read,
    is_missing_model,
    missing_variant,
    model_names,
    normalize_variant,
    read_variants,
)

T = TypeVar("T")

log = logging.getLogger("vocos_client")

class VocosClient(ClientBase):
    """Synthesize speech with the Vocos models on a Triton server (gRPC): the default variant (the
    charactr 24 kHz mel and EnCodec checkpoints, or whatever the server was built with), or any named
    variant the server holds (``variant="NAME"``, see :meth:`variants`).

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
        max_seconds: the longest item in seconds of audio (at any variant's rate); must match the server's
            ``max_seconds`` model parameter (60 by default). Longer inputs are rejected, never truncated.
        validate: check inputs against the serving contract before sending (default). ``False`` leaves
            the checks to the server (same messages, one round trip later); meant for tests.
        api_key: the key a server started with ``--api-key-file`` requires for inference (sent as gRPC
            metadata on every call; use TLS so that it does not cross the network in plaintext).
            Without it such a server raises :class:`PermissionDeniedError`.

    Variants: a client learns a variant's geometry (sample rate, mel bins, hop, padding, bandwidths) from
    the server the first time it is used (the ``config.pbtxt`` parameters of its vocoder) and keeps it.
    For the default variant, a server that cannot be reached or publishes no geometry means the charactr
    geometry (24 kHz, 100 mel bins, hop 256): inputs are still checked locally, and the next call asks
    again. A named variant is looked up under the call's retry and deadline rules; one the server does not
    hold raises :class:`InvalidInputError`.

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

    # -- variants ---------------------------------------------------------------------------------
    def variants(self, timeout: Optional[float] = None) -> List[Variant]:
        """The variants the server holds, as it reports them: one :class:`~vocos_client.Variant` per
        (variant, kind) whose vocoder is loaded, with its sample rate, input channels, hop, n_fft, padding,
        streaming lookahead, bandwidths and models. The default variant is listed twice, as ``"default"``
        of kind ``mel`` and of kind ``encodec``. Sorted by (name != "default", name, kind).

        Reads the server's list of loaded models (inference statistics, which need no admin key) and the
        configs of each variant's vocoder and streaming model; ``UNAVAILABLE`` is retried within
        ``timeout`` (default: the client's).
        """
        client = self._triton()
        attempts = Attempts(self._options, timeout, "variants")
        headers = self._options.headers()
        names = model_names(self._retrying(attempts, lambda: client.get_inference_statistics(
            headers=headers, client_timeout=attempts.remaining())))
        configs: Dict[str, Dict[str, str]] = {}
        for model in configs_to_read(names):
            try:
                configs[model] = config_parameters(self._retrying(attempts, lambda m=model: client.get_model_config(
                    m, headers=headers, client_timeout=attempts.remaining())))
            except VocosError as exc:
                if not is_missing_model(exc):
                    raise
                names.remove(model)  # unloaded since the list was made
        return read_variants(names, configs, self._geometries)

    def geometry_of(self, variant: Optional[str] = None, kind: str = "mel", *,
                    timeout: Optional[float] = None) -> Geometry:
        """The :class:`~vocos_triton.contract.Geometry` of ``variant``'s ``kind`` vocoder (``"mel"`` or
        ``"encodec"``) as the server publishes it (learnt once, then kept). For the default variant, the
        charactr geometry while the server cannot be reached or publishes none."""
        name = normalize_variant(variant)
        check_kind(kind)
        return self._geometry(name, kind, Attempts(self._options, timeout, variant_model(VOCODERS[kind], name)))

    def sample_rate_of(self, variant: Optional[str] = None, kind: str = "mel", *,
                       timeout: Optional[float] = None) -> int:
        """The sample rate (Hz) of the audio ``variant``'s ``kind`` vocoder makes, as the server says
        (:meth:`geometry_of`). :attr:`sample_rate` is the default variant's nominal 24000."""
        return self.geometry_of(variant, kind, timeout=timeout).sample_rate

    def _geometry(self, variant: str, kind: str, attempts: Attempts) -> Geometry:
        """The geometry of (variant, kind): cached, else read from the server (see :class:`VocosClient`)."""
        known = self._geometries.get(variant, kind)
        if known is not None:
            return known
        client = self._triton()
        model = variant_model(VOCODERS[kind], variant)
        while True:
            try:
                response = client.get_model_config(model, headers=self._options.headers(),
                                                   client_timeout=attempts.remaining())
                return self._geometries.learn(variant, kind, config_parameters(response))
            except InferenceServerException as exc:
                error = from_triton(exc)
                outcome = lookup_failure(variant, kind, error)
                if isinstance(outcome, Geometry):
                    return outcome
                if outcome == MISSING:
                    raise missing_variant(variant, kind, self._model_names(attempts)) from None
                delay = attempts.next_delay(error)
                if delay is None:
                    return lookup_exhausted(variant, kind, error, attempts)
                time.sleep(delay)

    def _model_names(self, attempts: Attempts) -> Optional[List[str]]:
        """The server's loaded models, for an error message: one try, ``None`` if it fails."""
        try:
            return model_names(self._triton().get_inference_statistics(headers=self._options.headers(),
                                                                       client_timeout=attempts.remaining()))
        except InferenceServerException:
            return None

    def _retrying(self, attempts: Attempts, send: Callable[[], T]) -> T:
        """``send()`` (one tritonclient call), retried after ``UNAVAILABLE`` within ``attempts``."""
        attempts.raise_if_exhausted()
        while True:
            try:
                return send()
            except InferenceServerException as exc:
                error = from_triton(exc)
                if not isinstance(error, ServerUnavailableError):
                    raise error from exc
                delay = attempts.next_delay(error)
                if delay is None:
                    raise attempts.give_up(error) from exc
                time.sleep(delay)

    # -- inference --------------------------------------------------------------------------------
    def synthesize(
        self,
        *,
        mel: Optional[ArrayLike] = None,
        audio: Optional[ArrayLike] = None,
        sample_rate: Optional[int] = None,
        bandwidth: Optional[float] = None,
        codes: Optional[ArrayLike] = None,
        variant: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> np.ndarray:
        """One waveform, float32, shape (samples,), at the variant's sample rate (:meth:`sample_rate_of`;
        24 kHz for the charactr checkpoints). Give exactly one of:

        * ``mel``: (C, T) log-mel features (e.g. from an acoustic model), C the variant's mel bins (100
          for the default), T >= 2 (1 for a ``same``-padded variant); float dtype or a nested list;
          (1, C, T) is accepted too. Returns (T - 1) * hop samples (``same``: T * hop; the default:
          hop 256) (model ``vocos_mel``).
        * ``audio`` + ``sample_rate``: mono (L,) audio in any float dtype or int8/int16/int32/uint8 PCM,
          resampled to the variant's rate with soxr ("HQ"). Without ``bandwidth`` it is resynthesized
          through the mel path (``resynthesize_mel``; the default variant needs at least 513 samples at
          24 kHz), with ``bandwidth`` (kbps: 1.5, 3, 6 or 12) through EnCodec (``resynthesize_encodec``).
          Returns about L * variant rate / ``sample_rate`` samples.
        * ``codes``: (K, T) EnCodec codes of any integer dtype in [0, 1024), K = 2/4/8/16 for
          1.5/3/6/12 kbps (``bandwidth`` may be left out: it follows from K). Bark's fine tokens are
          (8, T) at 6 kbps. (K, 1, T) and (1, K, T) are accepted too. Returns T * 320 samples.

        ``variant``: the server's variant to use (``None``: the default one, the contract's model names);
        a named variant serves one kind, mel or EnCodec (:meth:`variants`).

        Raises:
            InvalidInputError: the input breaks the contract (found locally, or by the server), or the
                server has no such variant.
            ServerUnavailableError: the server could not be reached after ``retries`` retries.
            DeadlineExceededError: ``timeout`` ran out.
            ServerError: any other server failure.
        """
        call = Call.make(variant, mel=mel, audio=audio, sample_rate=sample_rate, bandwidth=bandwidth, codes=codes)
        attempts = Attempts(self._options, timeout, variant_model(VOCODERS[call.kind], call.variant))
        request = call.prepare(self._options, self._geometry(call.variant, call.kind, attempts))
        attempts.what = request.model
        return self._infer(request, timeout, attempts)

    def synthesize_batch(
        self,
        items: Sequence[BatchItem],
        *,
        variant: Optional[str] = None,
        max_concurrency: int = 8,
        timeout: Optional[float] = None,
        return_exceptions: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> List[Union[np.ndarray, VocosError]]:
        """Synthesize many items concurrently so that the server's dynamic batcher batches them.

        Args:
            items: mel arrays (C, T_i), or dicts of :meth:`synthesize` keywords (``{"audio": x,
                "sample_rate": 16000}``, ``{"codes": c}``, ``{"mel": m, "variant": "matcha-22k"}``, ...);
                kinds and variants may be mixed.
            variant: the variant of every item that names none (``None``: the default variant).
            max_concurrency: requests in flight at once (the models batch up to 8 items).
            timeout: per item, from the moment it is sent (default: the client's ``timeout``); each
                variant's first lookup has a timeout of its own.
            return_exceptions: like :func:`asyncio.gather`: put each failed item's exception in its place
                in the result instead of raising.
            progress: called with an item's index as it finishes (in completion order, from a worker thread).

        Returns:
            One float32 (samples,) waveform per item, in input order, each at its variant's sample rate.

        Raises:
            VocosError: unless ``return_exceptions``, the failure of the lowest-numbered failing item, its
                message prefixed ``item <index>: `` and ``.item`` set. Every item is validated before
                any is sent, so one bad item costs no requests; after a server-side failure, items not
                yet sent are cancelled.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: expected >= 1, got {max_concurrency}")
        calls = batch_calls(items, variant)
        geometries: Dict[Tuple[str, str], Union[Geometry, VocosError]] = {}
        for key in geometry_keys(calls):
            try:
                geometries[key] = self._geometry(*key, Attempts(self._options, timeout,
                                                                variant_model(VOCODERS[key[1]], key[0])))
            except VocosError as exc:
                geometries[key] = exc
        prepared = prepare_batch(self._options, calls, geometries, return_exceptions)
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

    def _infer(self, request: Request, timeout: Optional[float], attempts: Optional[Attempts] = None) -> np.ndarray:
        """Send one prepared request, retrying ``UNAVAILABLE`` within the call's deadline (``attempts``:
        the call's schedule, when it has begun)."""
        client = self._triton()
        inputs = triton_inputs(grpcclient, request)
        attempts = attempts or Attempts(self._options, timeout, request.model)
        try:
            result = self._retrying(attempts, lambda: client.infer(
                request.model, inputs, outputs=self._outputs, client_timeout=attempts.remaining(),
                headers=self._options.headers(), timeout=attempts.request_timeout_us()))
        except InvalidInputError as exc:
            self._refused(request, exc)
            raise
        return waveform(result, request.model)

    # -- streaming ---------------------------------------------------------------------------------
    def stream(
        self,
        *,
        mel: Optional[ChunkSource] = None,
        codes: Optional[ChunkSource] = None,
        bandwidth: Optional[float] = None,
        chunk_frames: Optional[int] = None,
        variant: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[np.ndarray]:
        """Stream audio as features arrive: an iterator of float32 (samples,) pieces at the variant's sample
        rate, in order.

        The pieces, concatenated, equal :meth:`synthesize` of the concatenated input (exactly: the server
        releases a sample once every frame it depends on has arrived: the variant's ``lookahead_frames``,
        29 for the charactr checkpoints, see :meth:`variants`). Give one of:

        * ``mel``: (C, T) log-mel frames, C the variant's mel bins (model ``vocos_mel_stream``), or
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
        (default: the client's) bounds the whole stream. ``variant``: the server's variant (``None``: the
        default one), whose streaming model (``vocos_mel_stream__NAME``, ``decode_codes_stream__NAME``)
        serves the stream; its geometry is looked up (once) when ``stream()`` is called.

        Raises (while iterating):
            InvalidInputError: a chunk breaks the contract (checked locally before it is sent, with the
                server's words, or refused by the server), or the whole stream is longer than
                ``max_seconds`` or shorter than the offline minimum (2 frames for a centred mel), or the
                server has no such variant.
            ServerUnavailableError: the server stayed busy or unreachable at the start of the stream
                (retried with the client's backoff while no audio had come back; never later).
            DeadlineExceededError: ``timeout`` ran out.
            ServerError: any other server failure.
        """
        call = check_call(self._options, mel=mel, codes=codes, bandwidth=bandwidth, chunk_frames=chunk_frames,
                          variant=variant)
        attempts = Attempts(self._options, timeout, variant_model(STREAM_MODELS[call.kind], call.variant))
        stream_plan = plan_call(self._options, call, self._geometry(call.variant, call.geometry_kind, attempts))
        return stream(self._triton(), self._options, stream_plan, timeout)
