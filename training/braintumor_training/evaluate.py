"""``braintumor evaluate``: test-set metrics, temperature scaling, figures and a Markdown report.

Writes ``RUN_DIR/evaluation/`` with ``metrics.json``, ``report.md`` and PNG figures. The calibration
temperature is fitted on the validation split (never on Testing) and stored in ``metrics.json`` so that
``braintumor export`` builds it into the served model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from braintumor.config import LABELS
from braintumor_training.dataset import TEST_SPLIT, ImageRecord, load_arrays, scan_dataset
from braintumor_training.metrics import calibrated, classification_metrics, fit_temperature
from braintumor_training.model import tta_logits
from braintumor_training.train import BEST_CHECKPOINT, run_preprocessing

EVALUATION_DIR = "evaluation"


class EvaluationError(RuntimeError):
    """The run folder lacks what evaluation needs."""


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a run's ``config.json`` and ``audit.json``."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        audit = json.loads((run_dir / "audit.json").read_text())
    except FileNotFoundError as err:
        raise EvaluationError(f"{run_dir} is not a training run folder ({err.filename} missing)") from err
    return config, audit


def run_sets(data_dir: Path, audit: dict[str, Any]) -> dict[str, list[ImageRecord]]:
    """The image sets a run is judged on: validation, Testing and the leak-free Testing subset."""
    records = scan_dataset(data_dir)
    by_path = {r.path: r for r in records}
    leak_free = set(audit["leak_free_test"])
    test = [r for r in records if r.split == TEST_SPLIT]
    return {
        "validation": [by_path[p] for p in audit["split"]["val"]],
        "test": test,
        "test_leak_free": [r for r in test if r.path in leak_free],
    }


def load_classifier(run_dir: Path) -> keras.Model:
    """Load a run's best checkpoint."""
    path = run_dir / BEST_CHECKPOINT
    if not path.exists():
        raise EvaluationError(f"{path} not found: train the run first")
    return keras.models.load_model(path, compile=False)


def _plot_confusion(matrix: np.ndarray, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=30)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            colour = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=colour)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reliability(before: dict[str, Any], after: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for metrics, name in ((before, "raw"), (after, "temperature-scaled")):
        bins = [b for b in metrics["reliability"] if b["count"]]
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            "o-",
            label=f"{name} (ECE {metrics['ece']:.3f})",
        )
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability on Testing")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(metrics: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | F1 | ROC AUC | n |", "|---|---:|---:|---:|---:|---:|"]
    for label, m in metrics["per_class"].items():
        auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "–"
        lines.append(f"| {label} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {auc} | {m['support']} |")
    return lines


def summary_rows(metrics: dict[str, Any]) -> list[str]:
    """A Markdown table of headline metrics, one row per evaluated set."""
    lines = [
        "| set | images | accuracy | macro-F1 | tumor sensitivity | tumor specificity | ECE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("validation", "test", "test_leak_free"):
        m = metrics[name]
        lines.append(
            f"| {name} | {m['n_images']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | "
            f"{m['tumor_sensitivity']:.4f} | {m['tumor_specificity']:.4f} | {m['ece']:.4f} |"
        )
    return lines


def render_report(metrics: dict[str, Any]) -> str:
    """The evaluation report in Markdown."""
    lines = [
        "# Evaluation report",
        "",
        f"Run: `{metrics['run_dir']}`. Calibration temperature fitted on validation: "
        f"T = {metrics['temperature']:.4f} (ECE on Testing {metrics['test_uncalibrated']['ece']:.4f} before, "
        f"{metrics['test']['ece']:.4f} after). All figures below use the temperature-scaled probabilities, "
        "as served. A tumor is called when 1 − p(notumor) ≥ 0.5."
        + (
            " Test-time augmentation: the mean logits of each image and its left-right mirror."
            if metrics.get("tta") == "flip"
            else ""
        ),
        "",
        *summary_rows(metrics),
        "",
        "The leak-free subset holds the Testing images with no near duplicate in Training (see the audit).",
        "",
    ]
    for name in ("test", "test_leak_free"):
        m = metrics[name]
        lines += [
            f"## {name} ({m['n_images']} images)",
            "",
            *_table(m),
            "",
            f"Tumor vs no tumor: sensitivity {m['tumor_sensitivity']:.4f}, specificity "
            f"{m['tumor_specificity']:.4f}, ROC AUC {m.get('tumor_auc', float('nan')):.4f}; best sensitivity "
            f"at specificity ≥ 0.97: {m.get('sensitivity_at_specificity_0.97', float('nan')):.4f}.",
            "",
            f"![confusion matrix](confusion_{name}.png)",
            "",
        ]
    lines += ["## Calibration", "", "![reliability diagram](reliability.png)", ""]
    return "\n".join(lines)


def evaluate_run(run_dir: Path, data_dir: Path | None = None, tta: str = "none") -> dict[str, Any]:
    """Evaluate a run's best checkpoint; writes and returns ``evaluation/metrics.json``.

    Args:
        run_dir: the training run folder.
        data_dir: dataset root (default: the one recorded in the run's configuration).
        tta: test-time augmentation the served model will apply (``none`` or ``flip``); the temperature is
            fitted, and every figure computed, with it. Export builds the served model to match.
    """
    run_dir = Path(run_dir)
    config, audit = load_run(run_dir)
    data_dir = Path(data_dir or config["data_dir"])
    model = load_classifier(run_dir)
    size = int(config["image_size"])
    preprocessing = run_preprocessing(config)
    logits: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for name, records in run_sets(data_dir, audit).items():
        pixels, labels[name] = load_arrays(data_dir, records, preprocessing=preprocessing)
        logits[name] = tta_logits(model, pixels.astype(np.float32), tta)

    temperature = fit_temperature(logits["validation"], labels["validation"])
    metrics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data_dir": str(data_dir),
        "temperature": temperature,
        "image_size": size,
        "tta": tta,
    }
    for name in logits:
        metrics[name] = classification_metrics(calibrated(logits[name], temperature), labels[name])
    metrics["test_uncalibrated"] = classification_metrics(calibrated(logits["test"], 1.0), labels["test"])

    out = run_dir / EVALUATION_DIR
    out.mkdir(exist_ok=True)
    for name in ("test", "test_leak_free"):
        _plot_confusion(
            np.array(metrics[name]["confusion_matrix"]),
            f"{name} (n={metrics[name]['n_images']})",
            out / f"confusion_{name}.png",
        )
    _plot_reliability(metrics["test_uncalibrated"], metrics["test"], out / "reliability.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(render_report(metrics))
    return metrics
