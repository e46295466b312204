"""``AsyncTumorClassifier``: the asyncio client, built on ``tritonclient.grpc.aio``.

The twin of :class:`braintumor.classifier.TumorClassifier` over the same :class:`braintumor._core.ClientCore`
(deadlines, retries, metadata check, version following, named errors, every method), for programs that run an
event loop. Image decoding runs in worker threads so it does not block the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, Unpack

import numpy as np
import tritonclient.grpc.aio as grpcaio

from braintumor._core import Batch, BatchOptions, ClientCore, Images, ServedModel, Strategy, to_predictions
from braintumor.errors import (
    BrainTumorError,
    InferenceError,
    ModelNotReadyError,
    ServerUnavailableError,
    server_stopping,
)
from braintumor.prediction import Prediction
from braintumor.preprocessing import ImageSource

T = TypeVar("T")


class AsyncTumorClassifier(ClientCore):
    """Classify MRI slices with the served model from asyncio code.

    Args: see :class:`braintumor._core.ClientCore`, as :class:`~braintumor.classifier.TumorClassifier`, except
    that with ``check`` (the default) the served model is checked on entering ``async with`` rather than in the
    constructor (or call :meth:`connect`).

    Example::

        async with AsyncTumorClassifier("127.0.0.1:8001") as classifier:
            predictions = await classifier.predict_batch(paths)
    """

    transport = grpcaio

    async def _call(
        self,
        fn: Callable[[], Awaitable[T]],
        during: str,
        balanced: bool = False,
        request: dict[str, Any] | None = None,
    ) -> T:
        for attempt in self._attempts(during, balanced):
            if request is not None and attempt.timeout is not None:
                request["client_timeout"] = attempt.timeout  # the time left of the call
            with attempt:
                return await fn()
            await asyncio.sleep(attempt.delay)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt raises

    # -- lifecycle --------------------------------------------------------------------------------------
    async def connect(self) -> ServedModel:
        """Read the served model's metadata and configuration and check them against this SDK.

        Raises:
            ServerUnavailableError, ModelNotReadyError, ModelMismatchError: as ``TumorClassifier.connect``.
        """
        if not self.target.balanced:
            return self._connected(*await self._read(self._client))
        read = {}
        for server in await asyncio.to_thread(self.target.addresses):
            client = self._server_client(server)
            try:
                read[server] = await self._read(client, server)
            except (ServerUnavailableError, ModelNotReadyError) as err:
                gone = isinstance(err, ServerUnavailableError) or server_stopping(err.__cause__)
                if self.model is None or not gone:  # the first check wants every server; later, those still up
                    raise
            finally:
                await client.close()
        return self._connected_servers(read)

    async def _read(self, client: grpcaio.InferenceServerClient, server: str | None = None) -> tuple[dict, dict]:
        request, during = self._metadata_request(server)
        metadata = await self._call(lambda: client.get_model_metadata(**request), during)
        config = await self._call(lambda: client.get_model_config(**request), during)
        return metadata, config

    async def wait_until_ready(self, timeout: float = 60.0) -> ServedModel:
        """Poll the model's readiness (without blocking the loop) until it is ready, then :meth:`connect`.

        Args:
            timeout: seconds to wait at most; then :class:`ModelNotReadyError`, naming the last error.
        """
        for poll in self._polls(timeout):
            with poll:
                if await self._client.is_model_ready(**self._ready_request()):
                    return await self.connect()
            await asyncio.sleep(self._poll_interval)
        raise AssertionError("unreachable")  # pragma: no cover - the polls end by raising

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self._client.close()

    async def __aenter__(self) -> AsyncTumorClassifier:
        if self.check:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- inference --------------------------------------------------------------------------------------
    async def _served(self) -> ServedModel:
        return self.model or await self.connect()

    async def _following_latest(self, call: Callable[[bool], Awaitable[T]]) -> T:
        """As ``TumorClassifier._following_latest``: follow a new latest version once, unless pinned."""
        try:
            return await call(not self.model_version)
        except ModelNotReadyError:
            if not self._follows_latest:
                raise
        await self.connect()
        return await call(False)

    async def preprocess(self, image: ImageSource, frame: int | None = None) -> np.ndarray:
        """The tensor this client sends for ``image`` (see ``TumorClassifier.preprocess``), made in a thread.

        Args:
            image: a path, bytes, PIL image, array or DICOM.
            frame: the frame of a multi-frame image.
        """
        served = await self._served()
        return await asyncio.to_thread(served.preprocessing, image, frame)

    async def predict_pixels(
        self, pixels: np.ndarray, explain: bool = False, explain_label: str | None = None
    ) -> list[Prediction]:
        """Classify already preprocessed pixels in one request (see ``TumorClassifier.predict_pixels``).

        Args:
            pixels: uint8 tensors as :meth:`preprocess` makes them, stacked: ``(n, size, size, 3)``.
            explain: add each image's Grad-CAM map.
            explain_label: explain this class rather than the predicted one.
        """
        return await self._infer(await self._served(), pixels, explain, explain_label)

    async def _infer(
        self, served: ServedModel, pixels: np.ndarray, explain: bool, explain_label: str | None
    ) -> list[Prediction]:
        request, during = self._infer_request(served, pixels, explain, explain_label)
        start = time.perf_counter()
        try:
            result = await self._call(lambda: self._client.infer(**request), during, balanced=True, request=request)
        except InferenceError as err:
            plain = self._without_answered_by(served, err)
            if plain is None:
                raise
            # a server that is no canary refused the answered_by output before running anything: once without it
            request, during = self._infer_request(plain, pixels, explain, explain_label)
            result = await self._call(lambda: self._client.infer(**request), during, balanced=True, request=request)
        return to_predictions(result, (time.perf_counter() - start) * 1000.0, explain, explain_label)

    async def predict(
        self, image: ImageSource, frame: int | None = None, explain: bool = False, explain_label: str | None = None
    ) -> Prediction:
        """Classify one image; decoding runs in a worker thread. ``explain`` adds its Grad-CAM map.

        Args:
            image: a path, bytes, PIL image, array, or DICOM.
            frame: which frame of a multi-frame image.
            explain: add its Grad-CAM map.
            explain_label: explain this class rather than the predicted one.
        """

        async def attempt(_follow: bool) -> Prediction:
            served = await self._served()
            pixels = await asyncio.to_thread(served.preprocessing, image, frame)
            return (await self._infer(served, pixels[None], explain, explain_label))[0]

        return await self._following_latest(attempt)

    async def predict_batch(
        self, images: Images, strategy: Strategy = "concurrent", workers: int = 8, **options: Unpack[BatchOptions]
    ) -> list[Prediction | BrainTumorError]:
        """Classify several images; results keep the input order (see ``TumorClassifier.predict_batch``).

        Args:
            images: the images.
            strategy: ``concurrent`` (batch-1 requests, ``workers`` in flight) or ``packed``.
            workers: threads that preprocess the images, and requests in flight for ``concurrent``.
            frame: the frame of multi-frame images.
            explain: also fetch each image's Grad-CAM map.
            explain_label: the class to explain instead of the predicted one.
            return_errors: put each failed image's error in its place instead of raising it.
        """
        batch = Batch(images, strategy, workers, **options)
        if not len(images):
            return []
        return await self._following_latest(lambda follow: self._predict_batch(batch, follow))

    async def _predict_batch(self, batch: Batch, follow: bool) -> list[Prediction | BrainTumorError]:
        served = await self._served()
        tensors = await asyncio.to_thread(batch.preprocess, served)
        requests = batch.requests(served, tensors)
        in_flight = asyncio.Semaphore(batch.in_flight)

        async def send(pixels: np.ndarray) -> list[Prediction]:
            async with in_flight:
                return await self._infer(served, pixels, batch.explain, batch.explain_label)

        outcomes = await asyncio.gather(*(send(pixels) for _, pixels in requests), return_exceptions=True)
        return batch.assemble(tensors, requests, outcomes, follow)


__all__ = ["AsyncTumorClassifier", "Strategy"]
