"""``AsyncVocosClient``: the asyncio twin of :class:`~vocos_client.VocosClient` over ``tritonclient.grpc.aio``."""
from __future__ import annotations

import asyncio
import logging
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
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
from ._stream import STREAM_MODELS, ChunkSource, StreamCall, astream, check_call, plan_call
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


class AsyncVocosClient(ClientBase):
    """The asyncio twin of :class:`~vocos_client.VocosClient`: same arguments, same methods, awaited.

    The gRPC channel is opened on first use, inside the running event loop (a ``grpc.aio`` channel
    belongs to the loop it was made in), so the client may be constructed anywhere. Use
    ``async with`` or ``await client.close()``.

    Input preparation (conversion, soxr resampling, validation) runs in the event loop: it takes
    milliseconds even for 60 s of audio.
    """

    def _open(self) -> None:
        self._client: Optional[aioclient.InferenceServerClient] = None
        self._closed = False
        self._outputs = [aioclient.InferRequestedOutput(OUTPUT)]

    # -- lifecycle --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the gRPC channel; later calls raise :class:`VocosError`. Calling it twice is harmless."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> AsyncVocosClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def _triton(self) -> aioclient.InferenceServerClient:
        if self._closed:
            raise VocosError("the client is closed")
        if self._client is None:
            self._client = aioclient.InferenceServerClient(**self._options.client_kwargs())
        return self._client

    # -- health -----------------------------------------------------------------------------------
    async def ready(self, *, models: Optional[Iterable[str]] = None, timeout: Optional[float] = None) -> bool:
        """See :meth:`VocosClient.ready`."""
        client = self._triton()
        attempts = Attempts(self._options, timeout, "ready")
        names = list(ENTRY_MODELS if models is None else models)
        try:
            if not await client.is_server_ready(headers=self._options.headers(), client_timeout=attempts.remaining()):
                log.info("server at %s is not ready", self.url)
                return False
            for name in names:
                if not await client.is_model_ready(name, headers=self._options.headers(),
                                                  client_timeout=attempts.remaining()):
                    log.info("model %s at %s is not ready", name, self.url)
                    return False
        except InferenceServerException as exc:
            log.info("server at %s is not ready: %s", self.url, from_triton(exc))
            return False
        return True

    # -- variants ---------------------------------------------------------------------------------
    async def variants(self, timeout: Optional[float] = None) -> List[Variant]:
        """See :meth:`VocosClient.variants`."""
        client = self._triton()
        attempts = Attempts(self._options, timeout, "variants")
        headers = self._options.headers()
        names = model_names(await self._retrying(attempts, lambda: client.get_inference_statistics(
            headers=headers, client_timeout=attempts.remaining())))
        configs: Dict[str, Dict[str, str]] = {}
        for model in configs_to_read(names):
            try:
                configs[model] = config_parameters(await self._retrying(
                    attempts, lambda m=model: client.get_model_config(m, headers=headers,
                                                                      client_timeout=attempts.remaining())))
            except VocosError as exc:
                if not is_missing_model(exc):
                    raise
                names.remove(model)  # unloaded since the list was made
        return read_variants(names, configs, self._geometries)

    async def geometry_of(self, variant: Optional[str] = None, kind: str = "mel", *,
                          timeout: Optional[float] = None) -> Geometry:
        """See :meth:`VocosClient.geometry_of`."""
        name = normalize_variant(variant)
        check_kind(kind)
        return await self._geometry(name, kind, Attempts(self._options, timeout, variant_model(VOCODERS[kind], name)))

    async def sample_rate_of(self, variant: Optional[str] = None, kind: str = "mel", *,
                             timeout: Optional[float] = None) -> int:
        """See :meth:`VocosClient.sample_rate_of`."""
        return (await self.geometry_of(variant, kind, timeout=timeout)).sample_rate

    async def _geometry(self, variant: str, kind: str, attempts: Attempts) -> Geometry:
        """See :meth:`VocosClient._geometry`."""
        known = self._geometries.get(variant, kind)
        if known is not None:
            return known
        client = self._triton()
        model = variant_model(VOCODERS[kind], variant)
        while True:
            try:
                response = await client.get_model_config(model, headers=self._options.headers(),
                                                         client_timeout=attempts.remaining())
                return self._geometries.learn(variant, kind, config_parameters(response))
            except InferenceServerException as exc:
                error = from_triton(exc)
                outcome = lookup_failure(variant, kind, error)
                if isinstance(outcome, Geometry):
                    return outcome
                if outcome == MISSING:
                    raise missing_variant(variant, kind, await self._model_names(attempts)) from None
                delay = attempts.next_delay(error)
                if delay is None:
                    return lookup_exhausted(variant, kind, error, attempts)
                await asyncio.sleep(delay)

    async def _model_names(self, attempts: Attempts) -> Optional[List[str]]:
        try:
            return model_names(await self._triton().get_inference_statistics(
                headers=self._options.headers(), client_timeout=attempts.remaining()))
        except InferenceServerException:
            return None

    async def _retrying(self, attempts: Attempts, send: Callable[[], Awaitable[T]]) -> T:
        """``await send()`` (one tritonclient call), retried after ``UNAVAILABLE`` within ``attempts``."""
        attempts.raise_if_exhausted()
        while True:
            try:
                return await send()
            except InferenceServerException as exc:
                error = from_triton(exc)
                if not isinstance(error, ServerUnavailableError):
                    raise error from exc
                delay = attempts.next_delay(error)
                if delay is None:
                    raise attempts.give_up(error) from exc
                await asyncio.sleep(delay)

    # -- inference --------------------------------------------------------------------------------
    async def synthesize(
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
        """See :meth:`VocosClient.synthesize`: a float32 (samples,) waveform at the variant's sample rate."""
        call = Call.make(variant, mel=mel, audio=audio, sample_rate=sample_rate, bandwidth=bandwidth, codes=codes)
        attempts = Attempts(self._options, timeout, variant_model(VOCODERS[call.kind], call.variant))
        request = call.prepare(self._options, await self._geometry(call.variant, call.kind, attempts))
        attempts.what = request.model
        return await self._infer(request, timeout, attempts)

    async def synthesize_batch(
        self,
        items: Sequence[BatchItem],
        *,
        variant: Optional[str] = None,
        max_concurrency: int = 8,
        timeout: Optional[float] = None,
        return_exceptions: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> List[Union[np.ndarray, VocosError]]:
        """See :meth:`VocosClient.synthesize_batch`: ``asyncio.gather``-style, at most ``max_concurrency``
        requests in flight (a semaphore); results in input order. If the call is cancelled, so are
        its requests."""
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: expected >= 1, got {max_concurrency}")
        calls = batch_calls(items, variant)
        geometries: Dict[Tuple[str, str], Union[Geometry, VocosError]] = {}
        for key in geometry_keys(calls):
            try:
                geometries[key] = await self._geometry(*key, Attempts(self._options, timeout,
                                                                      variant_model(VOCODERS[key[1]], key[0])))
            except VocosError as exc:
                geometries[key] = exc
        prepared = prepare_batch(self._options, calls, geometries, return_exceptions)
        semaphore = asyncio.Semaphore(max_concurrency)

        async def one(index: int, request: Request) -> np.ndarray:
            async with semaphore:
                try:
                    return await self._infer(request, timeout)
                finally:
                    if progress is not None:
                        progress(index)

        results: List[Any] = [None] * len(prepared)
        tasks: Dict[int, asyncio.Task] = {}
        for index, request in enumerate(prepared):
            if isinstance(request, VocosError):
                results[index] = request
                if progress is not None:
                    progress(index)
            else:
                tasks[index] = asyncio.ensure_future(one(index, request))
        try:
            for index, task in tasks.items():  # input order: the lowest failing index wins
                try:
                    results[index] = await task
                except VocosError as exc:
                    if not return_exceptions:
                        raise exc.for_item(index) from exc
                    results[index] = exc.for_item(index)
        finally:
            # On failure or cancellation, no request outlives the call; gathering every task also
            # retrieves the errors of items after the failing one (no "exception never retrieved").
            for task in tasks.values():
                if not task.done():
                    task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
        return results

    async def _infer(self, request: Request, timeout: Optional[float],
                     attempts: Optional[Attempts] = None) -> np.ndarray:
        """Send one prepared request, retrying ``UNAVAILABLE`` within the call's deadline."""
        client = self._triton()
        inputs = triton_inputs(grpcclient, request)
        attempts = attempts or Attempts(self._options, timeout, request.model)
        try:
            result = await self._retrying(attempts, lambda: client.infer(
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
    ) -> AsyncIterator[np.ndarray]:
        """See :meth:`VocosClient.stream`: an async generator of float32 pieces (``async for piece in
        client.stream(mel=chunks)``). Chunks may come from an async iterable (pulled by a task, so that
        producing and receiving overlap) or a plain one (pulled in the event loop: keep its ``next()``
        quick). ``aclose()``, a ``break`` or the task's cancellation cancels the gRPC stream.

        The call itself (one input, ``chunk_frames``, the bandwidth, the variant's name) is checked when
        ``stream()`` is called; the variant's geometry is looked up, and a whole array checked against it,
        when iteration starts (a lookup needs the event loop)."""
        call = check_call(self._options, mel=mel, codes=codes, bandwidth=bandwidth, chunk_frames=chunk_frames,
                          variant=variant)
        return self._stream(call, timeout)

    async def _stream(self, call: StreamCall, timeout: Optional[float]) -> AsyncIterator[np.ndarray]:
        attempts = Attempts(self._options, timeout, variant_model(STREAM_MODELS[call.kind], call.variant))
        stream_plan = plan_call(self._options, call, await self._geometry(call.variant, call.geometry_kind, attempts))
        pieces = astream(self._triton, self._options, stream_plan, timeout)
        try:
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()
