"""``TumorClassifier``: the synchronous gRPC client of the served brain-tumor model.

One instance holds one gRPC channel, which is safe to share between threads. Every call has a deadline
(``timeout``); calls that fail with a retryable status (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``,
``ABORTED``) are retried with exponential backoff, others fail at once with a named error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from braintumor._model_check import ServedModel, check_model, requested_outputs, to_predictions
from braintumor.config import INPUT_NAME, MODEL_NAME
from braintumor.errors import (
    BrainTumorError,
    DeadlineExceededError,
    ModelNotReadyError,
    from_triton,
    retry_delay,
)
from braintumor.prediction import Prediction
from braintumor.preprocessing import ImageSource

T = TypeVar("T")
Strategy = Literal["packed", "concurrent"]


class TumorClassifier:
    """Classify MRI slices with the model served by Triton, over gRPC.

    Args:
        url: the server's gRPC ``host:port``.
        model_name: the served model.
        model_version: a version to pin, or ``None`` for the latest version the server serves when the
            client connects (requests then go to that version, whose preprocessing the client applies;
            when the server stops serving it, the client reconnects to the new latest once and retries).
        timeout: deadline of each call, in seconds.
        retries: further attempts after a retryable failure.
        backoff: first wait between attempts, in seconds (doubles each time).
        ssl: use TLS; ``root_certificates``, ``private_key`` and ``certificate_chain`` are PEM file paths
            (server CA, client key and certificate for mutual TLS).
        check: check the served model's metadata on construction (see :meth:`connect`).

    Raises:
        ServerUnavailableError, ModelNotReadyError, ModelMismatchError: when ``check`` finds a problem.

    Example::

        with TumorClassifier("127.0.0.1:8001") as classifier:
            print(classifier.predict("scan.jpg").label)
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
        check: bool = True,
    ) -> None:
        self.url, self.model_name, self.model_version = url, model_name, model_version
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._client = grpcclient.InferenceServerClient(
            url,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        self.model: ServedModel | None = None
        if check:
            self.connect()

    # -- plumbing ---------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], during: str) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except InferenceServerException as err:
                delay = retry_delay(err, during=during, attempt=attempt, retries=self.retries, backoff=self.backoff)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def _version(self) -> str:
        return self.model_version or ""

    # -- lifecycle --------------------------------------------------------------------------------------
    def connect(self) -> ServedModel:
        """Read the served model's metadata and configuration and check them against this SDK.

        Returns:
            What the SDK learned (image size, max batch size, versions).

        Raises:
            ServerUnavailableError: the server cannot be reached.
            ModelNotReadyError: the model or version is not loaded.
            ModelMismatchError: its input or output is not what the SDK sends or reads.
        """
        during = f"reading the metadata of {self.model_name} at {self.url}"
        metadata = self._call(
            lambda: self._client.get_model_metadata(
                self.model_name, self._version, as_json=True, client_timeout=self.timeout
            ),
            during,
        )
        config = self._call(
            lambda: self._client.get_model_config(
                self.model_name, self._version, as_json=True, client_timeout=self.timeout
            ),
            during,
        )
        self.model = check_model(metadata, config["config"], self._version)
        return self.model

    def wait_until_ready(self, timeout: float = 60.0) -> ServedModel:
        """Wait until the model is ready, then :meth:`connect`.

        Raises:
            ModelNotReadyError: when it is not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last: BrainTumorError | None = None
        while time.monotonic() < deadline:
            try:
                ready = self._client.is_model_ready(
                    self.model_name, self._version, client_timeout=min(self.timeout, 2.0)
                )
                if ready:
                    return self.connect()
            except InferenceServerException as err:
                last = from_triton(err, during=f"waiting for {self.model_name} at {self.url}")
            time.sleep(0.2)
        reason = f" (last error: {last})" if last else ""
        raise ModelNotReadyError(f"{self.model_name} at {self.url} was not ready within {timeout:.0f} s{reason}")

    def close(self) -> None:
        """Close the gRPC channel."""
        self._client.close()

    def __enter__(self) -> TumorClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference --------------------------------------------------------------------------------------
    def _served(self) -> ServedModel:
        return self.model or self.connect()

    def _following_latest(self, call: Callable[[], T]) -> T:
        """Run ``call``; when the version it went to is no longer served (and none is pinned), reconnect to
        the new latest version and run it once more (``call`` preprocesses again for that version)."""
        try:
            return call()
        except ModelNotReadyError:
            if self.model_version or self.model is None:
                raise
            self.connect()
            return call()

    def preprocess(self, image: ImageSource, frame: int | None = None) -> np.ndarray:
        """The tensor this client sends for ``image``: the shared preprocessing, with the parameters of the
        version requests go to (:attr:`ServedModel.preprocessing`)."""
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
        # ``served`` is read once by the caller: the tensor was made for exactly the version it goes to,
        # even when another thread reconnects meanwhile.
        names = requested_outputs(served, explain, explain_label)
        inp = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8))
        outputs = [grpcclient.InferRequestedOutput(name) for name in names]
        start = time.perf_counter()
        result = self._call(
            lambda: self._client.infer(
                self.model_name, [inp], model_version=served.version, outputs=outputs, client_timeout=self.timeout
            ),
            f"classifying with {self.model_name} at {self.url}",
        )
        return to_predictions(result, (time.perf_counter() - start) * 1000.0, explain, explain_label)

    def predict(
        self, image: ImageSource, frame: int | None = None, explain: bool = False, explain_label: str | None = None
    ) -> Prediction:
        """Classify one image (path, bytes, PIL image, array, or DICOM); ``explain`` adds its Grad-CAM map.

        Raises:
            InvalidImageError: when the image cannot be used; nothing is sent.
        """

        def attempt() -> Prediction:
            served = self._served()
            return self._infer(served, served.preprocessing(image, frame)[None], explain, explain_label)[0]

        return self._following_latest(attempt)

    def predict_batch(
        self, images: Sequence[ImageSource], strategy: Strategy = "concurrent", workers: int = 8
    ) -> list[Prediction]:
        """Classify several images; results keep the input order.

        Args:
            images: the images.
            strategy: ``concurrent`` sends batch-1 requests from ``workers`` threads and lets Triton's
                dynamic batcher group them; ``packed`` sends requests of up to the model's max batch size.
                ``concurrent`` is the default because it measured faster on the embedded CPU server (see
                the README's client benchmark).
            workers: threads that preprocess the images, and requests in flight for ``concurrent``.

        Raises:
            InvalidImageError: when any image cannot be used (raised before anything is sent).
        """
        if not len(images):
            return []
        return self._following_latest(lambda: self._predict_batch(images, strategy, workers))

    def _predict_batch(self, images: Sequence[ImageSource], strategy: Strategy, workers: int) -> list[Prediction]:
        served = self._served()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # decoding and cropping release the GIL
            pixels = np.stack(list(pool.map(served.preprocessing, images)))
        if strategy == "packed":
            step = served.max_batch_size
            chunks = [pixels[i : i + step] for i in range(0, len(pixels), step)]
            return [p for chunk in chunks for p in self._infer(served, chunk, False, None)]
        if strategy != "concurrent":
            raise ValueError(f"strategy must be 'packed' or 'concurrent', got {strategy!r}")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(lambda i: self._infer(served, pixels[i : i + 1], False, None)[0], range(len(pixels))))


__all__ = ["DeadlineExceededError", "Strategy", "TumorClassifier"]
