"""The committed model repository: every published version is complete and answers correctly."""

import json

import numpy as np
import pytest

from braintumor.config import (
    DEFAULT_MODEL_REPOSITORY,
    HEATMAP_NAME,
    IMAGE_SIZE,
    INPUT_NAME,
    LABELS,
    MODEL_NAME,
    OUTPUT_NAME,
)
from braintumor.model_repository import PREPROCESSING_FILE, read_preprocessing, versions
from braintumor.preprocessing import Preprocessing

ort = pytest.importorskip("onnxruntime")

MODEL_DIR = DEFAULT_MODEL_REPOSITORY / MODEL_NAME
REQUIRED = {
    "test": ["accuracy", "macro_f1", "tumor_sensitivity", "tumor_specificity"],
    "test_leak_free": ["accuracy", "n_images"],
}


def test_version_one_is_published():
    assert 1 in versions(MODEL_DIR)
    assert (MODEL_DIR / "labels.txt").read_text().split() == list(LABELS)
    assert (MODEL_DIR / "config.pbtxt").exists()


@pytest.mark.parametrize("version", versions(MODEL_DIR))
def test_each_version_has_model_card_metrics_and_a_working_onnx_model(version):
    folder = MODEL_DIR / str(version)
    metrics = json.loads((folder / "metrics.json").read_text())
    for split, keys in REQUIRED.items():
        for key in keys:
            assert key in metrics[split], f"{split}.{key}"
    card = (folder / "model-card.md").read_text().replace("*", "")
    assert "not a diagnostic device" in card and "leak-free" in card
    preprocessing = Preprocessing.from_json((folder / PREPROCESSING_FILE).read_text())
    assert preprocessing.size == IMAGE_SIZE
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), outputs = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == (INPUT_NAME, "tensor(uint8)", [IMAGE_SIZE, IMAGE_SIZE, 3])
    assert [o.name for o in outputs] == [OUTPUT_NAME, HEATMAP_NAME]
    x = np.random.default_rng(0).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    p = session.run(None, {INPUT_NAME: x})[0]
    assert p.shape == (4, len(LABELS)) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # runs every version over the leak-free Testing images
@pytest.mark.shared_data
@pytest.mark.parametrize("version", versions(MODEL_DIR))
def test_each_version_reproduces_its_published_leak_free_accuracy(shared_data, version):
    """Quality on real data: the served ONNX model's accuracy on the leak-free Testing subset, recomputed here
    from the images with the SDK's preprocessing (with that version's parameters), equals what its
    metrics.json claims."""
    from braintumor.preprocessing import preprocess_batch

    preprocessing = read_preprocessing(MODEL_DIR, IMAGE_SIZE)[version]
    metrics = json.loads((MODEL_DIR / str(version) / "metrics.json").read_text())
    audit_paths = metrics["leak_free_test_images"]
    session = ort.InferenceSession(str(MODEL_DIR / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    correct = 0
    for start in range(0, len(audit_paths), 64):
        chunk = audit_paths[start : start + 64]
        pixels = preprocess_batch([shared_data / p for p in chunk], preprocessing=preprocessing)
        predicted = session.run(None, {INPUT_NAME: pixels})[0].argmax(axis=1)
        correct += sum(LABELS[k] == p.split("/")[1] for k, p in zip(predicted, chunk, strict=True))
    accuracy = correct / len(audit_paths)
    assert len(audit_paths) == metrics["test_leak_free"]["n_images"]
    assert accuracy == pytest.approx(metrics["test_leak_free"]["accuracy"], abs=1e-9)
    assert accuracy >= 0.9
