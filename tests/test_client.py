"""The client SDK and ``braintumor predict`` against the real embedded server."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import free_ports
from PIL import Image

from synthetic import random_slice

pytest.importorskip("tritonclient.grpc")
pydicom = pytest.importorskip("pydicom")
ort = pytest.importorskip("onnxruntime")
from pydicom import examples

from braintumor.aio import AsyncTumorClassifier
from braintumor.classifier import TumorClassifier
from braintumor.config import IMAGE_SIZE, LABELS, MODEL_NAME
from braintumor.errors import (
    BrainTumorError,
    InferenceError,
    InvalidImageError,
    ModelNotReadyError,
)
from braintumor.model_repository import SERVED_VERSIONS, read_preprocessing
from braintumor.preprocessing import Preprocessing

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier(triton):
    with TumorClassifier(triton.config.grpc_url, timeout=10) as c:
        yield c


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_connect_reads_the_served_model(classifier, triton):
    assert classifier.model.image_size == IMAGE_SIZE
    assert classifier.model.max_batch_size == 32
    prediction = classifier.predict(random_slice(np.random.default_rng(0)))
    latest = max(read_preprocessing(triton.config.repository / MODEL_NAME, IMAGE_SIZE))
    assert prediction.label in LABELS and prediction.model_version == str(latest)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.tumor_probability == pytest.approx(1 - prediction.probabilities["notumor"])
    assert prediction.latency_ms > 0


def test_pinned_version_answers(triton):
    with TumorClassifier(triton.config.grpc_url, model_version="1") as pinned:
        assert pinned.predict(random_slice(np.random.default_rng(1))).model_version == "1"


def _served_versions(triton) -> dict[int, Preprocessing]:
    """The versions the server serves (the latest two) and the preprocessing each was trained with."""
    specs = read_preprocessing(triton.config.repository / MODEL_NAME, IMAGE_SIZE)
    return {v: specs[v] for v in sorted(specs)[-SERVED_VERSIONS:]}


def test_old_and_new_versions_are_served_side_by_side_each_with_its_own_preprocessing(triton):
    served = _served_versions(triton)
    assert len(set(served.values())) == 2, f"expected two served versions with different preprocessing: {served}"
    # A slice framed as another scanner would: small, off-centre, on a wide black border.
    slice_ = random_slice(np.random.default_rng(5))
    image = Image.new("L", (320, 320))
    image.paste(slice_.resize((150, 150)), (40, 120))
    tensors = {}
    for version, spec in served.items():
        with TumorClassifier(triton.config.grpc_url, model_version=str(version)) as pinned:
            assert pinned.model.preprocessing == spec  # read from the server's model configuration
            tensors[version] = pinned.preprocess(image)
            np.testing.assert_array_equal(tensors[version], spec(image))
            prediction = pinned.predict(image)
        assert prediction.model_version == str(version)
        session = ort.InferenceSession(str(triton.config.repository / MODEL_NAME / str(version) / "model.onnx"))
        expected = session.run(["probabilities"], {"image": tensors[version][None]})[0][0]
        got = np.array([prediction.probabilities[label] for label in LABELS])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    old, new = sorted(served)
    assert not np.array_equal(tensors[old], tensors[new])
    with TumorClassifier(triton.config.grpc_url) as latest:  # unpinned: the latest version and its preprocessing
        assert latest.model.version == str(new) and latest.model.preprocessing == served[new]
        assert latest.predict(image).model_version == str(new)


def test_an_unpinned_client_follows_a_new_latest_version_once(triton):
    with TumorClassifier(triton.config.grpc_url) as client:
        latest = client.model.version
        # As if the version it connected to had been unloaded since: the server answers NOT_FOUND.
        client.model = dataclasses.replace(client.model, version="99")
        assert client.predict(random_slice(np.random.default_rng(6))).model_version == latest
        assert client.model.version == latest
    with TumorClassifier(triton.config.grpc_url, model_version="1") as pinned:
        pinned.model = dataclasses.replace(pinned.model, version="99")
        with pytest.raises(ModelNotReadyError):
            pinned.predict(random_slice(np.random.default_rng(6)))


def test_an_unpinned_async_client_follows_a_new_latest_version_once(triton):
    async def run() -> tuple[str, str]:
        async with AsyncTumorClassifier(triton.config.grpc_url) as client:
            latest = client.model.version
            client.model = dataclasses.replace(client.model, version="99")
            prediction = await client.predict(random_slice(np.random.default_rng(7)))
            return latest, prediction.model_version

    latest, answered = asyncio.run(run())
    assert answered == latest


def test_served_predictions_equal_each_versions_keras_model_on_real_mri(triton, shared_data):
    tf = pytest.importorskip("tensorflow")
    from braintumor.config import DEFAULT_TFSERVING_BASE
    from braintumor_training.dataset import load_arrays, scan_dataset

    records = [r for r in scan_dataset(shared_data) if r.split == "Testing"][::131]
    for version, spec in _served_versions(triton).items():
        training_pixels, _ = load_arrays(shared_data, records, preprocessing=spec)
        with TumorClassifier(triton.config.grpc_url, model_version=str(version)) as pinned:
            sdk_pixels = np.stack([pinned.preprocess(shared_data / r.path) for r in records])
            assert np.array_equal(sdk_pixels, training_pixels)  # bit-exact: one preprocessing
            served = [pinned.predict(shared_data / r.path) for r in records]
        keras_model = tf.saved_model.load(str(DEFAULT_TFSERVING_BASE / MODEL_NAME / str(version)))
        expected = keras_model.signatures["serving_default"](image=tf.constant(training_pixels))["probabilities"]
        got = np.array([[p.probabilities[label] for label in LABELS] for p in served])
        assert np.abs(got - expected.numpy()).max() <= 1e-4, version


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: b"", "empty"),
        (lambda: b"definitely not an image", "not a recognised image format"),
        (lambda: _png(random_slice(np.random.default_rng(2)))[:300], "cannot read"),
        (lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 50, "cannot read"),
        (lambda: _png(Image.new("L", (9000, 9000))), "too large|more than"),
        (lambda: _png(Image.new("L", (1, 1))), "at least 16×16"),
    ],
    ids=["empty", "not-an-image", "truncated-png", "corrupt-jpeg", "decompression-bomb", "one-pixel"],
)
def test_bad_inputs_get_clear_errors_and_nothing_is_sent(classifier, make, message):
    with pytest.raises(InvalidImageError, match=message) as err:
        classifier.predict(make())
    assert err.value.status == "INVALID_ARGUMENT"
    assert isinstance(err.value, BrainTumorError)


def test_dicom_without_pixel_data_is_refused_without_leaking_the_header(classifier):
    dataset = examples.mr.copy()
    dataset.PatientName = "Doe^Jane"
    del dataset.PixelData
    with pytest.raises(InvalidImageError, match="without pixel data") as err:
        classifier.predict(_dicom_bytes(dataset))
    assert "Doe" not in str(err.value)


@pytest.mark.parametrize("kind", ["png16", "cmyk", "rgba", "palette", "tiff16", "dicom", "dicom-monochrome1"])
def test_other_formats_are_classified(classifier, kind, tmp_path):
    grey = random_slice(np.random.default_rng(3))
    if kind == "png16":
        source = _png(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257))
    elif kind == "tiff16":
        path = tmp_path / "x.tif"
        Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(path)
        source = path
    elif kind == "cmyk":
        source = grey.convert("RGB").convert("CMYK")
    elif kind == "rgba":
        source = grey.convert("RGBA")
    elif kind == "palette":
        source = _png(grey.convert("P"))
    else:
        dataset = examples.mr.copy()
        if kind == "dicom-monochrome1":
            dataset.PhotometricInterpretation = "MONOCHROME1"
        source = _dicom_bytes(dataset)
    prediction = classifier.predict(source)
    assert prediction.label in LABELS


def test_threaded_and_async_concurrency_agree_with_sequential(triton, classifier):
    rng = np.random.default_rng(6)
    images = [random_slice(rng, 224, k % 4) for k in range(24)]
    sequential = [classifier.predict(i).probabilities for i in images]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda i: classifier.predict(i).probabilities, images))
    assert _close(threaded, sequential)

    async def run(strategy: str) -> list[dict[str, float]]:
        async with AsyncTumorClassifier(triton.config.grpc_url) as client:
            return [p.probabilities for p in await client.predict_batch(images, strategy=strategy)]

    for strategy in ("packed", "concurrent"):
        assert _close(asyncio.run(run(strategy)), sequential)
        assert _close([p.probabilities for p in classifier.predict_batch(images, strategy=strategy)], sequential)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_both_clients_batch_with_explanations_and_keep_each_failure_in_its_place(triton, kind):
    rng = np.random.default_rng(8)
    images = [random_slice(rng), b"not an image", random_slice(rng)]
    options = {"strategy": "packed", "explain": True, "return_errors": True}

    async def run() -> tuple[list, np.ndarray, Preprocessing]:
        if kind == "sync":
            with TumorClassifier(triton.config.grpc_url) as client:
                return client.predict_batch(images, **options), client.preprocess(images[0]), client.model.preprocessing
        async with AsyncTumorClassifier(triton.config.grpc_url) as client:
            results = await client.predict_batch(images, **options)
            return results, await client.preprocess(images[0]), client.model.preprocessing

    results, tensor, preprocessing = asyncio.run(run())
    assert isinstance(results[1], InvalidImageError) and results[1].status == "INVALID_ARGUMENT"
    for prediction in (results[0], results[2]):
        assert prediction.label in LABELS and prediction.heatmap.shape == (5, 5)
        assert prediction.explained_label == prediction.label
    np.testing.assert_array_equal(tensor, preprocessing(images[0]))


def _close(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    return all(abs(x[k] - y[k]) <= 1e-5 for x, y in zip(a, b, strict=True) for k in LABELS)


def test_server_refusal_is_an_inference_error(classifier):
    with pytest.raises(InferenceError, match="batch-size") as err:
        classifier.predict_pixels(np.zeros((33, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    assert err.value.status == "INVALID_ARGUMENT"


def _predict_command(url: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "braintumor.cli", "predict", "--url", url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_predict_command_json_lines_and_exit_status(triton, tmp_path):
    good = tmp_path / "good.png"
    random_slice(np.random.default_rng(7)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    url = triton.config.grpc_url
    result = _predict_command(url, "--json", str(good), str(tmp_path / "bad.jpg"), str(tmp_path / "*.none"))
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1
    assert len(lines) == 3
    assert {"path", "label", "probabilities", "tumor_probability", "model_version"} <= set(lines[0])
    assert "error" in lines[1] and lines[1]["path"].endswith("bad.jpg")
    assert "error" in lines[2]
    ok = _predict_command(url, str(tmp_path / "*.png"))
    assert ok.returncode == 0 and "good.png" in ok.stdout
    overlays = tmp_path / "overlays"
    explained = _predict_command(url, "--json", "--explain", str(overlays), str(good))
    line = json.loads(explained.stdout)
    assert explained.returncode == 0 and line["explanation"] == str(overlays / "good.gradcam.png")
    assert len(line["heatmap"]) == 5 and line["explained_label"] == line["label"]
    assert Image.open(overlays / "good.gradcam.png").mode == "RGB"


def test_wait_until_ready_returns_the_model_or_fails_within_its_timeout(triton):
    with TumorClassifier(triton.config.grpc_url, check=False) as waiting:
        assert waiting.wait_until_ready(timeout=10).image_size == IMAGE_SIZE
    (port,) = free_ports(1)
    start = time.monotonic()
    with (
        TumorClassifier(f"127.0.0.1:{port}", check=False, timeout=0.5) as down,
        pytest.raises(ModelNotReadyError, match="not ready within 1 s"),
    ):
        down.wait_until_ready(timeout=1.0)
    assert time.monotonic() - start < 4.0
