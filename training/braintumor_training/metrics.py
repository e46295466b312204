"""Classification, screening and calibration metrics on predicted probabilities (NumPy/scikit-learn)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from braintumor.config import LABELS, NO_TUMOR_INDEX


def tumor_probability(probabilities: np.ndarray) -> np.ndarray:
    """Probability of any tumor class: ``1 - p(notumor)``."""
    return 1.0 - probabilities[:, NO_TUMOR_INDEX]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Top-label expected calibration error with equal-width confidence bins.

    Returns:
        ``ece`` and, per bin, its mean confidence, accuracy and count (for a reliability diagram).
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, rows = 0.0, []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        if n:
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += n / len(labels) * abs(acc - conf)
        else:
            conf = acc = float("nan")
        rows.append(
            {"lower": float(edges[b]), "upper": float(edges[b + 1]), "confidence": conf, "accuracy": acc, "count": n}
        )
    return {"ece": float(ece), "bins": rows}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``."""

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)``."""
    return softmax(logits / temperature, axis=1)


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, tumor_threshold: float = 0.5
) -> dict[str, Any]:
    """Everything the evaluation report shows for one set of images.

    Args:
        probabilities: ``(n, classes)`` predicted probabilities.
        labels: ``(n,)`` true class indices.
        tumor_threshold: a tumor is called when ``1 - p(notumor) >= tumor_threshold``.
    """
    classes = np.arange(len(LABELS))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    present = np.unique(labels)
    auc: dict[str, float | None] = {}
    for k, label in enumerate(LABELS):
        positives = labels == k
        auc[label] = float(roc_auc_score(positives, probabilities[:, k])) if 0 < positives.sum() < len(labels) else None

    is_tumor = labels != NO_TUMOR_INDEX
    p_tumor = tumor_probability(probabilities)
    called = p_tumor >= tumor_threshold
    n_tumor, n_clear = int(is_tumor.sum()), int((~is_tumor).sum())
    sensitivity = float((called & is_tumor).sum() / n_tumor) if n_tumor else float("nan")
    specificity = float((~called & ~is_tumor).sum() / n_clear) if n_clear else float("nan")
    screening: dict[str, Any] = {}
    if n_tumor and n_clear:
        fpr, tpr, thresholds = roc_curve(is_tumor, p_tumor)
        screening["tumor_auc"] = float(roc_auc_score(is_tumor, p_tumor))
        ok = (1.0 - fpr) >= 0.97
        best = int(np.argmax(np.where(ok, tpr, -1.0)))
        screening["sensitivity_at_specificity_0.97"] = float(tpr[best])
        screening["threshold_for_specificity_0.97"] = float(min(thresholds[best], 1.0))
    calibration = expected_calibration_error(probabilities, labels)
    nll = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())
    return {
        "n_images": len(labels),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        "per_class": {
            label: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "roc_auc": auc[label],
            }
            for k, label in enumerate(LABELS)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        "roc_auc_macro": float(np.mean([v for v in auc.values() if v is not None])) if any(auc.values()) else None,
        "tumor_threshold": tumor_threshold,
        "tumor_sensitivity": sensitivity,
        "tumor_specificity": specificity,
        **screening,
        "ece": calibration["ece"],
        "reliability": calibration["bins"],
        "nll": nll,
    }
