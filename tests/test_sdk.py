"""The client SDK without a server: both clients (the same tests run against the synchronous and the asyncio
twin), the retry policy over a failing channel, the shared batch planning, metadata checks and overlays.
The tests against the real server are in test_client.py."""

from __future__ import annotations

import asyncio
import inspect
import io
import time
from typing import Any

import numpy as np
import pytest
from helpers import free_ports
from PIL import Image

from synthetic import random_slice

pytest.importorskip("tritonclient.grpc")
from pydicom import examples
from tritonclient.utils import InferenceServerException

from braintumor import AsyncTumorClassifier, TumorClassifier
from braintumor._core import Batch, check_model
from braintumor.config import IMAGE_SIZE, LABELS
from braintumor.errors import (
    BrainTumorError,
    InferenceError,
    InvalidImageError,
    ModelMismatchError,
    ModelNotReadyError,
    ServerUnavailableError,
    http_status,
)
from braintumor.explain import overlay
from braintumor.prediction import Prediction
from braintumor.preprocessing import Preprocessing, head_box, preprocess

TWINS = {"sync": TumorClassifier, "async": AsyncTumorClassifier}
METADATA = {
    "name": "braintumor",
    "versions": ["1", "2"],
    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE, 3]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}],
}


async def _done(value: Any) -> Any:
    """A twin's answer: the async twin's awaited, the sync twin's as it is."""
    return await value if inspect.isawaitable(value) else value


def _run(kind: str, scenario) -> Any:
    """Run ``scenario(client_class)`` in an event loop (the async twin's channel needs one; the sync one's
    calls simply block)."""
    return asyncio.run(scenario(TWINS[kind]))


def _down_url() -> str:
    (port,) = free_ports(1)
    return f"127.0.0.1:{port}"


def test_both_clients_offer_the_same_methods_with_the_same_parameters():
    def public(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")
        }

    assert public(TumorClassifier) == public(AsyncTumorClassifier)
    assert {"connect", "wait_until_ready", "preprocess", "predict", "predict_pixels", "predict_batch"} <= set(
        public(TumorClassifier)
    )
    assert inspect.signature(TumorClassifier) == inspect.signature(AsyncTumorClassifier)


@pytest.mark.parametrize("kind", TWINS)
def test_unavailable_is_retried_with_doubling_backoff_then_named(kind):
    async def scenario(cls):
        client = cls(_down_url(), check=False, timeout=1.0, retries=2, backoff=0.05)
        calls: list[float] = []
        real = client._client.get_model_metadata

        def counted(*args: Any, **kwargs: Any) -> Any:  # the real channel's call, counted
            calls.append(time.monotonic())
            return real(*args, **kwargs)

        client._client.get_model_metadata = counted
        try:
            with pytest.raises(ServerUnavailableError, match=client.url) as err:
                await _done(client.connect())
        finally:
            await _done(client.close())
        return calls, err.value

    calls, error = _run(kind, scenario)
    assert len(calls) == 3 and error.status == "UNAVAILABLE"
    assert calls[1] - calls[0] >= 0.045 and calls[2] - calls[1] >= 0.09  # the wait doubles


@pytest.mark.parametrize("kind", TWINS)
@pytest.mark.parametrize(
    ("status", "attempts", "error"),
    [
        ("StatusCode.UNAVAILABLE", 3, ServerUnavailableError),
        ("StatusCode.RESOURCE_EXHAUSTED", 3, InferenceError),
        ("StatusCode.INVALID_ARGUMENT", 1, InferenceError),
        ("StatusCode.NOT_FOUND", 1, ModelNotReadyError),
    ],
)
def test_only_retryable_statuses_are_retried(kind, status, attempts, error):
    async def scenario(cls):
        client = cls(_down_url(), check=False, retries=2, backoff=0.01)
        calls = []

        def fail() -> None:
            calls.append(status)
            raise InferenceServerException("boom", status=status)

        async def fail_async() -> None:
            fail()

        try:
            with pytest.raises(BrainTumorError) as err:
                await _done(client._call(fail if kind == "sync" else fail_async, "testing retries"))
        finally:
            await _done(client.close())
        return len(calls), err.value

    calls, raised = _run(kind, scenario)
    assert calls == attempts and type(raised) is error
    assert raised.status == status.removeprefix("StatusCode.") and "testing retries: boom" in str(raised)


@pytest.mark.parametrize("kind", TWINS)
def test_wait_until_ready_gives_up_within_its_timeout_naming_the_last_error(kind):
    async def scenario(cls):
        client = cls(_down_url(), check=False, timeout=0.5)
        start = time.monotonic()
        try:
            with pytest.raises(ModelNotReadyError, match=r"not ready within 1 s \(last error: .*\)"):
                await _done(client.wait_until_ready(timeout=1.0))
        finally:
            await _done(client.close())
        return time.monotonic() - start

    assert _run(kind, scenario) < 4.0


@pytest.mark.parametrize("kind", TWINS)
def test_a_server_that_is_down_gives_a_clear_error_within_the_deadline(kind):
    async def scenario(cls):
        url = _down_url()
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=url):
            if kind == "sync":
                cls(url, timeout=1.0, retries=1, backoff=0.1)  # checks in the constructor
            else:
                async with cls(url, timeout=1.0, retries=1, backoff=0.1):  # checks on entering
                    pass
        return time.monotonic() - start

    assert _run(kind, scenario) < 5.0


@pytest.mark.parametrize("kind", TWINS)
def test_a_bad_strategy_is_refused_before_anything_is_sent(kind):
    async def scenario(cls):
        client = cls(_down_url(), check=False)
        try:
            with pytest.raises(ValueError, match="'packed' or 'concurrent'"):
                await _done(client.predict_batch([b"x"], strategy="sideways"))
            assert await _done(client.predict_batch([])) == []
        finally:
            await _done(client.close())

    _run(kind, scenario)


def _served(max_batch_size: int = 3):
    return check_model(METADATA, {"max_batch_size": max_batch_size})


def test_batches_are_planned_packed_or_one_image_per_request():
    served = _served()
    images = [random_slice(np.random.default_rng(k)) for k in range(7)]
    tensors = Batch(images, workers=2).preprocess(served)
    assert [len(i) for i, _ in Batch(images, "packed").requests(served, tensors)] == [3, 3, 1]
    concurrent = Batch(images, "concurrent").requests(served, tensors)
    assert [i for i, _ in concurrent] == [[k] for k in range(7)]
    assert concurrent[0][1].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert Batch(images, "packed", workers=8).in_flight == 1 and Batch(images, workers=8).in_flight == 8


def test_a_batch_raises_its_first_failure_or_keeps_each_in_its_place():
    served = _served()
    images = [random_slice(np.random.default_rng(0)), b"not an image", random_slice(np.random.default_rng(1))]
    with pytest.raises(InvalidImageError):
        Batch(images).preprocess(served)
    batch = Batch(images, return_errors=True)
    tensors = batch.preprocess(served)
    assert isinstance(tensors[1], InvalidImageError) and tensors[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    requests = batch.requests(served, tensors)
    assert [i for i, _ in requests] == [[0], [2]]
    prediction = Prediction.from_probabilities(np.array([0.1, 0.2, 0.6, 0.1]), "braintumor", "2", 1.0)
    refused = InferenceError("refused", status="INVALID_ARGUMENT")
    results = batch.assemble(tensors, requests, [[prediction], refused], follow=False)
    assert results[0] == prediction and results[1] is tensors[1] and results[2] is refused
    with pytest.raises(InvalidImageError):  # without return_errors: the first failure in input order
        Batch(images).assemble(tensors, requests, [[prediction], refused], follow=False)
    with pytest.raises(InferenceError):
        Batch(images).assemble(
            [tensors[0], tensors[2]],
            [([0], requests[0][1]), ([1], requests[1][1])],
            [
                [prediction],
                refused,
            ],
            follow=False,
        )
    gone = ModelNotReadyError("version 2 is gone")
    with pytest.raises(ModelNotReadyError):  # so that an unpinned client follows the new latest version
        batch.assemble(tensors, requests, [[prediction], gone], follow=True)
    assert batch.assemble(tensors, requests, [[prediction], gone], follow=False)[2] is gone
    with pytest.raises(ZeroDivisionError):  # a bug is never kept as a result
        batch.assemble(tensors, requests, [[prediction], ZeroDivisionError()], follow=False)


def test_metadata_mismatch_is_an_error_not_a_wrong_answer():
    metadata = {
        "name": "m",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 224, 224, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
    }
    with pytest.raises(ModelMismatchError, match="UINT8") as err:
        check_model(metadata, {"max_batch_size": 8})
    assert "FP32 [batch, 4]" in str(err.value)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidImageError("x"), 422),
        (ServerUnavailableError("x"), 503),
        (ModelNotReadyError("x"), 503),
        (ModelMismatchError("x"), 502),
        (InferenceError("x", status="DEADLINE_EXCEEDED"), 504),
        (InferenceError("x"), 502),
    ],
)
def test_each_error_has_a_grpc_and_an_http_status(error, status):
    assert isinstance(error.status, str) and http_status(error) == status


def test_overlay_draws_the_map_only_where_the_cropped_model_looked():
    image = Image.new("L", (300, 300))
    image.paste(random_slice(np.random.default_rng(9)).resize((150, 150)), (20, 120))
    prediction = Prediction.from_probabilities(
        np.array([0.7, 0.1, 0.1, 0.1]), "braintumor", "2", 1.0, heatmaps=np.ones((4, 5, 5), np.float32)
    )
    left, top, right, bottom = head_box(image)
    cropped = np.asarray(overlay(image, prediction, preprocessing=Preprocessing(crop_to_head=True)), dtype=int)
    grey = np.asarray(image, dtype=int)[:, :, None]
    outside = np.ones(grey.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(cropped[outside], np.repeat(grey, 3, axis=2)[outside])  # untouched outside the crop
    assert (cropped[top:bottom, left:right] != np.repeat(grey, 3, axis=2)[top:bottom, left:right]).any(axis=2).all()
    whole = np.asarray(overlay(image, prediction), dtype=int)  # uncropped versions: the map covers everything
    assert (whole != np.repeat(grey, 3, axis=2)).any(axis=2).all()
    assert set(LABELS) == set(prediction.probabilities)


def _dicom_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_sixteen_bit_and_monochrome1_are_converted_as_a_viewer_would():
    grey = np.asarray(random_slice(np.random.default_rng(4)))
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    stretched = (grey.astype(float) - grey.min()) * 255 / (grey.max() - grey.min())
    assert np.abs(preprocess(wide, 224)[:, :, 0].astype(int) - np.rint(stretched)).max() <= 1
    mono2 = preprocess(_dicom_bytes(examples.mr), 64)
    flipped = examples.mr.copy()
    flipped.PhotometricInterpretation = "MONOCHROME1"
    mono1 = preprocess(_dicom_bytes(flipped), 64)
    assert np.abs(mono1.astype(int) + mono2.astype(int) - 255).max() <= 1


def test_multi_frame_dicom_needs_a_frame():
    frames = np.stack([examples.mr.pixel_array] * 3)
    dataset = examples.mr.copy()
    dataset.NumberOfFrames = 3
    dataset.PixelData = frames.tobytes()
    data = _dicom_bytes(dataset)
    with pytest.raises(InvalidImageError, match="3 frames"):
        preprocess(data)
    assert preprocess(data, frame=2).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
