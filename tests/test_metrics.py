import numpy as np
import pytest
from scipy.special import softmax

from braintumor.config import NO_TUMOR_INDEX
from braintumor_training.metrics import (
    calibrated,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    tumor_probability,
)


def test_fit_temperature_recovers_the_true_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(20000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits / 2.5, axis=1)])
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_ece_is_zero_when_confidence_equals_accuracy_and_large_when_overconfident():
    labels = np.zeros(1000, dtype=int)
    p = np.tile([0.7, 0.1, 0.1, 0.1], (1000, 1))
    labels[:300] = 1  # 70% correct at confidence 0.7
    assert expected_calibration_error(p, labels)["ece"] == pytest.approx(0.0, abs=1e-9)
    sharp = calibrated(np.log(p) * 10, 1.0)
    assert expected_calibration_error(sharp, labels)["ece"] > 0.25


def test_screening_metrics_count_tumor_vs_no_tumor():
    # 4 tumors (one missed: called notumor) and 2 clear scans (one false alarm)
    labels = np.array([0, 1, 3, 0, NO_TUMOR_INDEX, NO_TUMOR_INDEX])
    p = np.full((6, 4), 0.02)
    for i, k in enumerate([0, 1, 3, NO_TUMOR_INDEX, NO_TUMOR_INDEX, 3]):
        p[i, k] = 0.94
    m = classification_metrics(p, labels)
    assert m["tumor_sensitivity"] == pytest.approx(3 / 4)
    assert m["tumor_specificity"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert np.array(m["confusion_matrix"]).sum() == 6 and m["confusion_matrix"][0][NO_TUMOR_INDEX] == 1
    assert tumor_probability(p)[0] == pytest.approx(0.98)
    assert m["per_class"]["glioma"]["recall"] == pytest.approx(0.5)
