"""``AsyncVocosClient``: the asyncio twin of :class:`~vocos_client.VocosClient` over ``tritonclient.grpc.aio``."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
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
from ._stream import ChunkSource, astream, plan

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

    # -- inference --------------------------------------------------------------------------------
    async def synthesize(
        self,
        *,
        mel: Optional[ArrayLike] = None,
        audio: Optional[ArrayLike] = None,
        sample_rate: Optional[int] = None,
        bandwidth: Optional[float] = None,
        codes: Optional[ArrayLike] = None,
        timeout: Optional[float] = None,
    ) -> np.ndarray:
        """See :meth:`VocosClient.synthesize`: a float32 (samples,) waveform at 24 kHz."""
        request = self._options.prepare(mel=mel, audio=audio, sample_rate=sample_rate, bandwidth=bandwidth,
                                        codes=codes)
        return await self._infer(request, timeout)

    async def synthesize_batch(
        self,
        items: Sequence[BatchItem],
        *,
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
        prepared = prepare_batch(self._options, items, return_exceptions)
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

    async def _infer(self, request: Request, timeout: Optional[float]) -> np.ndarray:
        """Send one prepared request, retrying ``UNAVAILABLE`` within the call's deadline."""
        client = self._triton()
        inputs = triton_inputs(grpcclient, request)
        attempts = Attempts(self._options, timeout, request.model)
        while True:
            try:
                result = await client.infer(request.model, inputs, outputs=self._outputs,
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
                await asyncio.sleep(delay)

    # -- streaming ---------------------------------------------------------------------------------
    def stream(
        self,
        *,
        mel: Optional[ChunkSource] = None,
        codes: Optional[ChunkSource] = None,
        bandwidth: Optional[float] = None,
        chunk_frames: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> AsyncIterator[np.ndarray]:
        """See :meth:`VocosClient.stream`: an async generator of float32 pieces (``async for piece in
        client.stream(mel=chunks)``). Chunks may come from an async iterable (pulled by a task, so that
        producing and receiving overlap) or a plain one (pulled in the event loop: keep its ``next()``
        quick). ``aclose()``, a ``break`` or the task's cancellation cancels the gRPC stream."""
        stream_plan = plan(self._options, mel=mel, codes=codes, bandwidth=bandwidth, chunk_frames=chunk_frames)
        return astream(self._triton, self._options, stream_plan, timeout)
