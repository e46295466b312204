"""``AsyncTumorClassifier``: the asyncio client, built on ``tritonclient.grpc.aio``.

Same behaviour as :class:`braintumor.classifier.TumorClassifier` (deadlines, retries, metadata check,
named errors), for programs that run an event loop. Image decoding runs in a worker thread so it does
not block the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from braintumor._model_check import ServedModel, check_model, requested_outputs, to_predictions
from braintumor.config import INPUT_NAME, MODEL_NAME
from braintumor.errors import BrainTumorError, ModelNotReadyError, from_triton, retry_delay
from braintumor.prediction import Prediction
from braintumor.preprocessing import ImageSource

T = TypeVar("T")


class AsyncTumorClassifier:
    """Classify MRI slices with the served model from asyncio code.

    Args: as :class:`~braintumor.classifier.TumorClassifier`, except that the metadata check happens in
    :meth:`connect` (or on entering ``async with``), not in the constructor.

    Example::

        async with AsyncTumorClassifier("127.0.0.1:8001") as classifier:
            predictions = await asyncio.gather(*(classifier.predict(p) for p in paths))
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        model_name: str = MODEL_NAME,
        model_version: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.2,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
    ) -> None:
        self.url, self.model_name, self.model_version = url, model_name, model_version
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._client = grpcaio.InferenceServerClient(
            url,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        self.model: ServedModel | None = None

    async def _call(self, fn: Callable[[], Awaitable[T]], during: str) -> T:
        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except InferenceServerException as err:
                delay = retry_delay(err, during=during, attempt=attempt, retries=self.retries, backoff=self.backoff)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def connect(self) -> ServedModel:
        """Read and check the served model's metadata (see ``TumorClassifier.connect``)."""
        version = self.model_version or ""
        during = f"reading the metadata of {self.model_name} at {self.url}"
        metadata = await self._call(
            lambda: self._client.get_model_metadata(
                self.model_name, version, as_json=True, client_timeout=self.timeout
            ),
            during,
        )
        config = await self._call(
            lambda: self._client.get_model_config(self.model_name, version, as_json=True, client_timeout=self.timeout),
            during,
        )
        self.model = check_model(metadata, config["config"], version)
        return self.model

    async def wait_until_ready(self, timeout: float = 60.0) -> ServedModel:
        """Wait until the model is ready, then :meth:`connect`.

        Raises:
            ModelNotReadyError: when it is not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last: BrainTumorError | None = None
        while time.monotonic() < deadline:
            try:
                if await self._client.is_model_ready(self.model_name, self.model_version or "", client_timeout=2.0):
                    return await self.connect()
            except InferenceServerException as err:
                last = from_triton(err, during=f"waiting for {self.model_name} at {self.url}")
            await asyncio.sleep(0.2)
        reason = f" (last error: {last})" if last else ""
        raise ModelNotReadyError(f"{self.model_name} at {self.url} was not ready within {timeout:.0f} s{reason}")

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self._client.close()

    async def __aenter__(self) -> AsyncTumorClassifier:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def predict_pixels(
        self, pixels: np.ndarray, explain: bool = False, explain_label: str | None = None
    ) -> list[Prediction]:
        """Classify already preprocessed uint8 pixels ``(n, size, size, 3)`` in one request."""
        return await self._infer(self.model or await self.connect(), pixels, explain, explain_label)

    async def _infer(
        self, served: ServedModel, pixels: np.ndarray, explain: bool, explain_label: str | None
    ) -> list[Prediction]:
        # ``served`` is read once by the caller: the tensor was made for exactly the version it goes to.
        names = requested_outputs(served, explain, explain_label)
        inp = grpcaio.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8))
        outputs = [grpcaio.InferRequestedOutput(name) for name in names]
        start = time.perf_counter()
        result = await self._call(
            lambda: self._client.infer(
                self.model_name,
                [inp],
                model_version=served.version,
                outputs=outputs,
                client_timeout=self.timeout,
            ),
            f"classifying with {self.model_name} at {self.url}",
        )
        return to_predictions(result, (time.perf_counter() - start) * 1000.0, explain, explain_label)

    async def predict(
        self, image: ImageSource, frame: int | None = None, explain: bool = False, explain_label: str | None = None
    ) -> Prediction:
        """Classify one image; decoding runs in a worker thread. ``explain`` adds its Grad-CAM map.

        As with ``TumorClassifier``, an unpinned client follows a new latest version once when the version it
        sent to is no longer served.
        """
        for attempt in (0, 1):
            served = self.model or await self.connect()
            pixels = await asyncio.to_thread(served.preprocessing, image, frame)
            try:
                return (await self._infer(served, pixels[None], explain, explain_label))[0]
            except ModelNotReadyError:
                if self.model_version or attempt:
                    raise
                await self.connect()
        raise AssertionError("unreachable")  # pragma: no cover

    async def predict_batch(self, images: Sequence[ImageSource]) -> list[Prediction]:
        """Classify several images concurrently (batch-1 requests that Triton batches); input order kept."""
        return list(await asyncio.gather(*(self.predict(image) for image in images)))
