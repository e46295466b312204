"""Grad-CAM served by Triton (computed in the ONNX graph) against TensorFlow's GradientTape."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tritonclient.grpc")

from braintumor.classifier import TumorClassifier
from braintumor.config import DEFAULT_TFSERVING_BASE, LABELS, MODEL_NAME
from braintumor.errors import ModelMismatchError
from braintumor.explain import overlay
from braintumor.model_repository import versions
from braintumor_training.dataset import load_arrays, scan_dataset

pytestmark = pytest.mark.slow


def _gradient_tape_cams(saved, pixels: np.ndarray, classes: list[int]) -> np.ndarray:
    features = saved.signatures["features"](image=tf.constant(pixels))
    maps = next(iter(features.values()))
    with tf.GradientTape() as tape:
        tape.watch(maps)
        logits = next(iter(saved.signatures["head_logits"](features=maps).values()))
        chosen = tf.gather(logits, classes, batch_dims=1)
    grads = tape.gradient(chosen, maps)
    weights = tf.reduce_mean(grads, axis=(1, 2))
    return tf.nn.relu(tf.einsum("nijk,nk->nij", maps, weights)).numpy()


def test_served_gradcam_matches_gradient_tape_on_real_mri(triton, shared_data):
    version = versions(DEFAULT_TFSERVING_BASE / MODEL_NAME)[-1]
    saved = tf.saved_model.load(str(DEFAULT_TFSERVING_BASE / MODEL_NAME / str(version)))
    records = [r for r in scan_dataset(shared_data) if r.split == "Testing"][::66]  # 20 images, all classes
    with TumorClassifier(triton.config.grpc_url, model_version=str(version)) as classifier:
        pixels, _ = load_arrays(shared_data, records, preprocessing=classifier.model.preprocessing)
        predictions = [
            p for i in range(len(pixels)) for p in classifier.predict_pixels(pixels[i : i + 1], explain=True)
        ]
        asked = classifier.predict_pixels(pixels[:1], explain=True, explain_label="notumor")[0]
    classes = [LABELS.index(p.label) for p in predictions]
    reference = _gradient_tape_cams(saved, pixels, classes)
    compared = 0
    for prediction, expected in zip(predictions, reference, strict=True):
        assert prediction.explained_label == prediction.label and prediction.heatmap.shape == expected.shape
        if expected.max() <= 1e-9:  # no positive evidence anywhere: both maps are zero
            assert prediction.heatmap.max() == 0.0
            continue
        correlation = np.corrcoef(prediction.heatmap.ravel(), expected.ravel())[0, 1]
        assert correlation >= 0.99, correlation
        compared += 1
    assert compared >= len(predictions) - 2
    assert asked.explained_label == "notumor"
    other = _gradient_tape_cams(saved, pixels[:1], [LABELS.index("notumor")])[0]
    if other.max() > 1e-9:
        assert np.corrcoef(asked.heatmap.ravel(), other.ravel())[0, 1] >= 0.99


def test_overlay_and_explain_errors(triton, tmp_path):
    from synthetic import random_slice

    image = random_slice(np.random.default_rng(8))
    with TumorClassifier(triton.config.grpc_url) as classifier:
        plain = classifier.predict(image)
        explained = classifier.predict(image, explain=True)
        with pytest.raises(ValueError, match="explain_label"):
            classifier.predict(image, explain=True, explain_label="cat")
    assert plain.heatmap is None and "heatmap" not in plain.to_dict()
    assert explained.to_dict()["explained_label"] == explained.label
    picture = overlay(image, explained)
    assert picture.size == image.size and picture.mode == "RGB"
    with pytest.raises(ValueError, match="explain=True"):
        overlay(image, plain)
    with pytest.raises(ModelMismatchError, match="cannot explain"):
        from braintumor._core import ServedModel, requested_outputs

        requested_outputs(ServedModel("old", ("1",), 160, 32, heatmap_size=0), True, None)


# END
