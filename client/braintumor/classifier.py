"""``TumorClassifier``: the synchronous gRPC client of the served brain-tumor model.

One instance holds one gRPC channel, which is safe to share between threads. Every call has a deadline
(``timeout``); calls that fail with a retryable status (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``,
``ABORTED``) are retried with exponential backoff, others fail at once with a named error. Requests,
checks, retries and decoding are :class:`braintumor._core.ClientCore`'s, shared with the asyncio twin
:class:`braintumor.aio.AsyncTumorClassifier`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, TypeVar, Unpack

import numpy as np
import tritonclient.grpc as grpcclient

from braintumor._core import Batch, BatchOptions, ClientCore, Images, ServedModel, Strategy, to_predictions
from braintumor.errors import (
    BrainTumorError,
    DeadlineExceededError,
    InferenceError,
    ModelNotReadyError,
    ServerUnavailableError,
    server_stopping,
)
from braintumor.prediction import Prediction
from braintumor.preprocessing import ImageSource

T = TypeVar("T")


class TumorClassifier(ClientCore, AbstractContextManager):
    """Classify MRI slices with the model served by Triton, over gRPC.

    Args: see :class:`braintumor._core.ClientCore` (``url``, ``model_name``, ``model_version``, ``timeout``,
    ``retries``, ``backoff``, ``ssl``, ``root_certificates``, ``private_key``, ``certificate_chain``,
    ``check``); with ``check`` (the default) the constructor checks the served model (:meth:`connect`).

    Raises:
        ServerUnavailableError, ModelNotReadyError, ModelMismatchError: when ``check`` finds a problem.

    Example::

        with TumorClassifier("127.0.0.1:8001") as classifier:
            print(classifier.predict("scan.jpg").label)
    """

    transport = grpcclient
    connects_on_init = True
    # ``with TumorClassifier(...) as classifier``: AbstractContextManager's __enter__ returns the client.

    def _call(
        self, fn: Callable[[], T], during: str, balanced: bool = False, request: dict[str, Any] | None = None
    ) -> T:
        for attempt in self._attempts(during, balanced):
            if request is not None and attempt.timeout is not None:
                request["client_timeout"] = attempt.timeout  # the time left of the call
            with attempt:
                return fn()
            time.sleep(attempt.delay)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt raises

    # -- lifecycle --------------------------------------------------------------------------------------
    def connect(self) -> ServedModel:
        """Read the served model's metadata and configuration and check them against this SDK.

        Returns:
            What the SDK learned (image size, max batch size, versions, each version's preprocessing).

        Raises:
            ServerUnavailableError: the server cannot be reached.
            ModelNotReadyError: the model or version is not loaded.
            ModelMismatchError: its input or output is not what the SDK sends or reads.
        """
        if not self.target.balanced:
            return self._connected(*self._read(self._client))
        read = {}
        for server in self.target.addresses():
            client = self._server_client(server)
            try:
                read[server] = self._read(client, server)
            except (ServerUnavailableError, ModelNotReadyError) as err:
                gone = isinstance(err, ServerUnavailableError) or server_stopping(err.__cause__)
                if self.model is None or not gone:  # the first check wants every server; later, those still up
                    raise
            finally:
                client.close()
        return self._connected_servers(read)

    def _read(self, client: grpcclient.InferenceServerClient, server: str | None = None) -> tuple[dict, dict]:
        request, during = self._metadata_request(server)
        metadata = self._call(lambda: client.get_model_metadata(**request), during)
        config = self._call(lambda: client.get_model_config(**request), during)
        return metadata, config

    def wait_until_ready(self, timeout: float = 60.0) -> ServedModel:
        """Wait until the model is ready, then :meth:`connect`.

        Args:
            timeout: how long to wait, in seconds.

        Raises:
            ModelNotReadyError: when it is not ready within ``timeout`` seconds.
        """
        for poll in self._polls(timeout):
            with poll:
                if self._client.is_model_ready(**self._ready_request()):
                    return self.connect()
            time.sleep(self._poll_interval)
        raise AssertionError("unreachable")  # pragma: no cover - the polls end by raising

    def close(self) -> None:
        """Close the gRPC channel."""
        self._client.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference --------------------------------------------------------------------------------------
    def _served(self) -> ServedModel:
        return self.model or self.connect()

    def _following_latest(self, call: Callable[[bool], T]) -> T:
        """Run ``call``; when the version it went to is no longer served (and none is pinned), reconnect to
        the new latest version and run it once more (``call`` preprocesses again for that version). ``call``
        is told whether a version failure may still be followed."""
        try:
            return call(not self.model_version)
        except ModelNotReadyError:
            if not self._follows_latest:
                raise
        self.connect()
        return call(False)

    def preprocess(self, image: ImageSource, frame: int | None = None) -> np.ndarray:
        """The tensor this client sends for ``image``: the shared preprocessing, with the parameters of the
        version requests go to (:attr:`ServedModel.preprocessing`).

        Args:
            image: a path, bytes, PIL image, array or DICOM.
            frame: the frame of a multi-frame image.
        """
        return self._served().preprocessing(image, frame)

    def predict_pixels(
        self, pixels: np.ndarray, explain: bool = False, explain_label: str | None = None
    ) -> list[Prediction]:
        """Classify already preprocessed pixels ``(n, size, size, 3)`` uint8 in one request.

        Args:
            pixels: the batch.
            explain: also fetch the Grad-CAM map (of the predicted class, or of ``explain_label``).
            explain_label: the class to explain instead of the predicted one.

        Raises:
            InferenceError: when the server refuses the request (wrong shape, batch too large, …).
            DeadlineExceededError: when it does not answer within the deadline.
            ModelMismatchError: when an explanation is asked of a model that serves none.
        """
        return self._infer(self._served(), pixels, explain, explain_label)

    def _infer(
        self, served: ServedModel, pixels: np.ndarray, explain: bool, explain_label: str | None
    ) -> list[Prediction]:
        request, during = self._infer_request(served, pixels, explain, explain_label)
        start = time.perf_counter()
        try:
            result = self._call(lambda: self._client.infer(**request), during, balanced=True, request=request)
        except InferenceError as err:
            plain = self._without_answered_by(served, err)
            if plain is None:
                raise
            # a server that is no canary refused the answered_by output before running anything: once without it
            request, during = self._infer_request(plain, pixels, explain, explain_label)
            result = self._call(lambda: self._client.infer(**request), during, balanced=True, request=request)
        return to_predictions(result, (time.perf_counter() - start) * 1000.0, explain, explain_label)

    def predict(
        self, image: ImageSource, frame: int | None = None, explain: bool = False, explain_label: str | None = None
    ) -> Prediction:
        """Classify one image (path, bytes, PIL image, array, or DICOM); ``explain`` adds its Grad-CAM map.

        Args:
            image: the image.
            frame: the frame of a multi-frame image.
            explain: also fetch the Grad-CAM map (of the predicted class, or of ``explain_label``).
            explain_label: the class to explain instead of the predicted one.

        Raises:
            InvalidImageError: when the image cannot be used; nothing is sent.
        """

        def attempt(_follow: bool) -> Prediction:
            served = self._served()
            return self._infer(served, served.preprocessing(image, frame)[None], explain, explain_label)[0]

        return self._following_latest(attempt)

    def predict_batch(
        self, images: Images, strategy: Strategy = "concurrent", workers: int = 8, **options: Unpack[BatchOptions]
    ) -> list[Prediction | BrainTumorError]:
        """Classify several images; results keep the input order.

        Args:
            images: the images.
            strategy: ``concurrent`` sends batch-1 requests from ``workers`` threads and lets Triton's
                dynamic batcher group them; ``packed`` sends requests of up to the model's max batch size.
                ``concurrent`` is the default because it measured faster on the embedded CPU server (see
                the README's client benchmark).
            workers: threads that preprocess the images, and requests in flight for ``concurrent``.
            frame: the frame of multi-frame images.
            explain: also fetch each image's Grad-CAM map (of its predicted class, or of ``explain_label``).
            explain_label: the class to explain instead of the predicted one.
            return_errors: put the :class:`BrainTumorError` of an image that failed (unusable, or its
                request refused) in its place and classify the others, instead of raising it.

        Raises:
            InvalidImageError: when any image cannot be used (raised before anything is sent), unless
                ``return_errors``.
        """
        batch = Batch(images, strategy, workers, **options)
        if not len(images):
            return []
        return self._following_latest(lambda follow: self._predict_batch(batch, follow))

    def _predict_batch(self, batch: Batch, follow: bool) -> list[Prediction | BrainTumorError]:
        served = self._served()
        tensors = batch.preprocess(served)
        requests = batch.requests(served, tensors)
        explain, label = batch.explain, batch.explain_label
        with ThreadPoolExecutor(max_workers=batch.in_flight) as pool:
            sent = [pool.submit(self._infer, served, pixels, explain, label) for _, pixels in requests]
        return batch.assemble(tensors, requests, [f.exception() or f.result() for f in sent], follow)


__all__ = ["DeadlineExceededError", "Strategy", "TumorClassifier"]
