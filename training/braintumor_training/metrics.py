"""Classification, screening and calibration metrics on predicted probabilities (NumPy/scikit-learn)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax
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


def binary_calibration_error(probability: np.ndarray, positive: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of a probability of one event (here: a tumour), equal-width bins.

    Args:
        probability: ``(n,)`` predicted probability of the event.
        positive: ``(n,)`` whether the event happened.
        bins: number of bins over [0, 1].

    Returns:
        ``Σ_b n_b / n · |mean(probability) − share positive|`` over the bins (0 for an empty input).
    """
    return _calibration_gap(np.asarray(probability, float), np.asarray(positive, float), bins)


def _calibration_gap(confidence: np.ndarray, outcome: np.ndarray, bins: int = 15) -> float:
    """``Σ_b n_b / n · |mean(confidence) − mean(outcome)|`` over equal-width bins, i.e. ``Σ_b |Σ(o − c)| / n``."""
    if not len(confidence):
        return 0.0
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True), 0, bins - 1)
    return float(np.abs(np.bincount(which, weights=outcome - confidence, minlength=bins)).sum() / len(confidence))


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a statistic of ``n`` images (for figures with no closed-form interval).

    Calibration errors are biased upwards on small samples, and their bootstrap distribution is too: the
    interval says how much the figure moves between samples of this size, not where an unbiased value lies.

    Args:
        statistic: maps the indices of a resample (``(n,)`` ints drawn with replacement) to the figure.
        n: images in the set.
        resamples: bootstrap resamples.
        level: coverage of the interval.
        seed: the resampling generator's seed (reports are reproducible).

    Returns:
        ``(low, high)``, or ``None`` for an empty set.
    """
    if n <= 0:
        return None
    generator = np.random.default_rng(seed)
    values = np.array([statistic(generator.integers(0, n, n)) for _ in range(resamples)])
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def calibration_intervals(probabilities: np.ndarray, labels: np.ndarray, resamples: int = 1000) -> dict[str, Any]:
    """Bootstrap 95 % intervals of the top-label ECE (images with a class) and of the tumour probability's ECE.

    Args:
        probabilities: ``(n, classes)`` calibrated probabilities.
        labels: ``(n,)`` class indices, -1 for a tumour of no class (counted by the tumour ECE only).
        resamples: bootstrap resamples.

    Returns:
        ``ece_interval`` and ``tumor_ece_interval``: ``[low, high]`` or ``None`` where nothing is counted.
    """
    probabilities, labels = np.asarray(probabilities, float), np.asarray(labels)
    typed = np.flatnonzero(labels >= 0)
    p_tumor, is_tumor = tumor_probability(probabilities), labels != NO_TUMOR_INDEX
    confidence = probabilities[typed].max(axis=1)
    correct = (probabilities[typed].argmax(axis=1) == labels[typed]).astype(float)
    top = bootstrap_interval(lambda i: _calibration_gap(confidence[i], correct[i]), len(typed), resamples)
    outcome = is_tumor.astype(float)
    tumour = bootstrap_interval(lambda i: _calibration_gap(p_tumor[i], outcome[i]), len(labels), resamples, seed=1)
    return {
        "ece_interval": list(top) if top else None,
        "tumor_ece_interval": list(tumour) if tumour else None,
    }


def set_log_likelihood(log_probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Log-probability of each image's allowed classes: its class, or every tumour class for label -1.

    Label -1 marks a tumour whose type is not one of the classes or not given (see
    :func:`braintumor_training.dataset.load_arrays`): its likelihood is ``1 − p(notumor)``, the loss
    training uses for it, so no type is guessed.

    Args:
        log_probabilities: ``(n, classes)`` log-softmax outputs.
        labels: ``(n,)`` class indices, -1 for a tumour of no class.
    """
    labels = np.asarray(labels)
    out = np.empty(len(labels))
    typed = labels >= 0
    out[typed] = log_probabilities[typed, labels[typed]]
    tumor_classes = [k for k in range(log_probabilities.shape[1]) if k != NO_TUMOR_INDEX]
    out[~typed] = logsumexp(log_probabilities[~typed][:, tumor_classes], axis=1)
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    Images labelled -1 (a tumour of no class) count with the likelihood of their allowed set, ``1 −
    p(notumor)`` (:func:`set_log_likelihood`); with only class labels this is the usual NLL.

    Args:
        logits: ``(n, classes)`` uncalibrated logits.
        labels: ``(n,)`` class indices, -1 for a tumour of no class.
    """

    def nll(log_t: float) -> float:
        return float(-set_log_likelihood(log_softmax(logits / np.exp(log_t), axis=1), labels).mean())

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


def partial_label_metrics(
    probabilities: np.ndarray, labels: np.ndarray, tumor_threshold: float = 0.5
) -> dict[str, Any]:
    """Metrics of a set where some tumours have no class (label -1): screening on all, classes on the rest.

    Args:
        probabilities: ``(n, classes)`` predicted probabilities.
        labels: ``(n,)`` class indices, -1 for a tumour whose type is not one of the classes or not given.
        tumor_threshold: a tumor is called when ``1 - p(notumor) >= tumor_threshold``.

    Returns:
        ``n_images``, ``n_labelled``; tumour ``tumor_sensitivity``, ``tumor_specificity``, ``tumor_auc`` and
        the tumour probability's calibration error ``tumor_ece`` over every image; ``ece`` (top-label) and
        ``nll`` over the labelled images only; ``labelled``: :func:`classification_metrics` of those.
    """
    labels = np.asarray(labels)
    typed = labels >= 0
    is_tumor = labels != NO_TUMOR_INDEX
    p_tumor = tumor_probability(probabilities)
    called = p_tumor >= tumor_threshold
    n_tumor, n_clear = int(is_tumor.sum()), int((~is_tumor).sum())
    out: dict[str, Any] = {
        "n_images": len(labels),
        "n_labelled": int(typed.sum()),
        "n_tumor_only": int((~typed).sum()),
        "tumor_threshold": tumor_threshold,
        "tumor_sensitivity": float((called & is_tumor).sum() / n_tumor) if n_tumor else float("nan"),
        "tumor_specificity": float((~called & ~is_tumor).sum() / n_clear) if n_clear else float("nan"),
        "tumor_auc": float(roc_auc_score(is_tumor, p_tumor)) if n_tumor and n_clear else None,
        "tumor_ece": binary_calibration_error(p_tumor, is_tumor),
        "set_nll": float(-set_log_likelihood(np.log(np.clip(probabilities, 1e-12, 1.0)), labels).mean())
        if len(labels)
        else float("nan"),
    }
    if typed.any():
        labelled = classification_metrics(probabilities[typed], labels[typed], tumor_threshold)
        out.update(ece=labelled["ece"], nll=labelled["nll"], accuracy=labelled["accuracy"], labelled=labelled)
    else:
        out.update(ece=float("nan"), nll=float("nan"), accuracy=float("nan"), labelled=None)
    return out
