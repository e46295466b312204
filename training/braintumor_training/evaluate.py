"""``braintumor evaluate``: test-set metrics, temperature scaling, subgroups, figures and a Markdown report.

Writes ``RUN_DIR/evaluation/`` with ``metrics.json``, ``report.md`` and PNG figures. The calibration
temperature is fitted on validation (never on a test set) and stored in ``metrics.json`` so that
``braintumor export`` builds it into the served model.

A run trained with a manifest dataset (``config.json`` ``external``) is also judged on that dataset's
validation part (``external_val``, for information) and test part (``external_test``, never used for any
choice), as the run split it (``external_split.json``). Its validation is then the folder dataset's
validation plus ``external_val``, and the temperature is fitted on both: a tumour whose type is not one of
the classes counts with the likelihood of its allowed set, ``1 − p(notumor)`` (the loss training uses for
it), so every validation image counts and no type is guessed.

Every test set is also broken into subgroups (:mod:`braintumor_training.subgroups`): per source, sequence
and finding, or per class, with 95 % Wilson intervals. :func:`evaluate_published` does the same for a
published ONNX version, so versions compare on the same images.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import matplotlib
import numpy as np
import onnxruntime as ort

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from braintumor.config import DEFAULT_MODEL_REPOSITORY, INPUT_NAME, LABELS, MODEL_NAME, OUTPUT_NAME
from braintumor.model_repository import MODEL_FILE, PREPROCESSING_FILE
from braintumor.preprocessing import Preprocessing
from braintumor_training.dataset import TEST_SPLIT, ImageRecord, load_arrays, scan_dataset
from braintumor_training.external import ManifestRecord, read_manifest, with_sequences_by_eye
from braintumor_training.failures import failure_rows, failure_sheet, failure_summary, render_failures
from braintumor_training.metrics import calibrated, classification_metrics, fit_temperature
from braintumor_training.model import classifier_at_size, tta_logits
from braintumor_training.model_card import CARD_FILE, set_section
from braintumor_training.sequences import read_hand_labels
from braintumor_training.subgroups import check_targets, compact, plot_forest, render_table, render_targets, score_set
from braintumor_training.train import BEST_CHECKPOINT, EXTERNAL_SPLIT_FILE, run_preprocessing

EVALUATION_DIR = "evaluation"
#: The sets broken into subgroups, in report order.
SUBGROUP_SETS = ("test", "test_leak_free", "external_test", "external_val")
#: Images per ONNX Runtime call when scoring a published version.
ONNX_BATCH = 32


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


def external_parts(
    split_file: Path,
    manifest_dir: Path,
    parts: tuple[str, ...] = ("val", "test"),
    sequences_by_eye: Path | None = None,
) -> dict[str, list[ManifestRecord]]:
    """The parts of a manifest dataset as a run split it: ``{"external_val": [...], "external_test": [...]}``.

    Args:
        split_file: the run's ``external_split.json`` (absolute image paths to ``train``/``val``/``test``).
        manifest_dir: the manifest dataset's folder.
        parts: which parts.
        sequences_by_eye: a hand-check CSV (``path`` relative to ``manifest_dir``, ``sequence``) whose
            images are also reported by that sequence (``docs/audit/br35h-test-sequences.csv``).

    Raises:
        EvaluationError: when the split file is missing or names none of the manifest's images, or the
            hand-check CSV cannot be read or names none of them.
    """
    if not Path(split_file).exists():
        raise EvaluationError(f"{split_file} not found: the run's split of its external dataset is needed")
    written = json.loads(Path(split_file).read_text())
    split, groups = written["parts"], written.get("groups", {})
    records = read_manifest(Path(manifest_dir), check_images=False)
    if not any(r.path in split for r in records):
        raise EvaluationError(f"{split_file} names none of the images of {manifest_dir} (moved since training?)")
    if sequences_by_eye is not None:
        try:
            records = with_sequences_by_eye(records, read_hand_labels(Path(sequences_by_eye)), Path(manifest_dir))
        except (OSError, ValueError) as err:  # ManifestError is a ValueError too
            raise EvaluationError(f"sequences by eye: {sequences_by_eye}: {err}") from err
        if not any(r.sequence_by_eye for r in records if split.get(r.path) in parts):
            raise EvaluationError(
                f"sequences by eye: {sequences_by_eye}: none of its images is in the {' or '.join(parts)} part "
                f"of {split_file} (another split?)"
            )
    records = [replace(r, group=groups.get(r.path)) for r in records]  # intervals that count groups as clusters
    return {f"external_{part}": [r for r in records if split.get(r.path) == part] for part in parts}


def external_sets(
    run_dir: Path, config: dict[str, Any], sequences_by_eye: Path | None = None
) -> dict[str, list[ManifestRecord]]:
    """A run's external validation and test parts (empty when it was trained without a manifest dataset).

    Args:
        run_dir: the run folder (its ``external_split.json``).
        config: its ``config.json``.
        sequences_by_eye: see :func:`external_parts`.
    """
    if not config.get("external"):
        return {}
    return external_parts(
        Path(run_dir) / EXTERNAL_SPLIT_FILE, Path(config["external"]), sequences_by_eye=sequences_by_eye
    )


def validation_logits(
    run_dir: Path, image_size: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A run's logits and labels on its validation sets: ``validation`` (Kaggle) and ``external_val``.

    Each through the run's own preprocessing and ``best.keras``, before any temperature; no test image is
    read. For exploratory checks on validation (``scripts/validation_*.py``).

    Args:
        run_dir: a run trained with ``--external``.
        image_size: feed the trained weights images of this side instead of the run's
            (:func:`braintumor_training.model.classifier_at_size`).

    Raises:
        EvaluationError: when the run has no external validation part.
    """
    config, audit = load_run(Path(run_dir))
    data_dir = Path(config["data_dir"])
    external = external_sets(Path(run_dir), config)
    if "external_val" not in external:
        raise EvaluationError(f"{run_dir} was trained without a manifest dataset (--external)")
    records = {"validation": run_sets(data_dir, audit)["validation"], "external_val": external["external_val"]}
    model, preprocessing = load_classifier(Path(run_dir)), run_preprocessing(config)
    if image_size is not None and image_size != preprocessing.size:
        model, preprocessing = classifier_at_size(model, image_size), replace(preprocessing, size=image_size)
    logits, labels = {}, {}
    for name, chosen in records.items():
        root = Path("/") if name == "external_val" else data_dir
        pixels, labels[name] = load_arrays(root, chosen, preprocessing=preprocessing)
        logits[name] = model.predict(pixels.astype(np.float32), batch_size=64, verbose=0)
    return logits, labels


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


#: How reports name the evaluated sets.
SET_TITLES = {
    "validation": "validation",
    "test": "Testing",
    "test_leak_free": "Testing, leak-free subset",
    "external_test": "external test part",
    "external_val": "external validation part (for information: it is part of the validation the temperature "
    "was fitted on)",
}


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def external_summary_rows(
    sets: dict[str, Any], names: tuple[str, ...] = ("external_val", "external_test")
) -> list[str]:
    """A Markdown table of the manifest dataset's parts: screening on every image, classes on the typed ones.

    Args:
        sets: scored sets by name (:func:`~braintumor_training.subgroups.score_set`).
        names: which sets, when present.
    """
    lines = [
        "| set | images | with one of the 4 classes | tumour sensitivity | specificity | tumour ROC AUC | "
        "accuracy (those) | ECE (those, top label) | ECE (tumour probability, all) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        if name not in sets:
            continue
        m = sets[name]
        lines.append(
            f"| {name} | {m['n_images']} | {m['n_labelled']} | {_number(m['tumor_sensitivity'])} | "
            f"{_number(m['tumor_specificity'])} | {_number(m.get('tumor_auc'))} | {_number(m['accuracy'])} | "
            f"{_number(m['ece'])} | "
            f"{_number(m['tumor_ece'])} |"
        )
    return lines


def subgroup_sections(
    sets_by_model: dict[str, dict[str, Any]], targets: list[dict[str, Any]], figure: str | None, level: str = "##"
) -> list[str]:
    """Markdown: the targets, then one subgroup table per evaluated set (models side by side), the figure.

    Args:
        sets_by_model: for each model (column name), its scored sets by name; the last is the one judged.
        targets: :func:`~braintumor_training.subgroups.check_targets` of the last model.
        figure: the forest plot's file name, or ``None``.
        level: Markdown heading level of the section.
    """
    last = sets_by_model[list(sets_by_model)[-1]]
    lines = [
        f"{level} Subgroups",
        "",
        "Proportions with their 95 % Wilson intervals (k/n where one model is shown). Tumour sensitivity counts "
        "every tumour, typed or not; specificity the normal slices; class accuracy the images whose type is "
        "one of the classes (*class counted*: on the external data gliomas and meningiomas, as it has no "
        "pituitary tumours; on Testing all four classes), by the top class of all four; glioma vs meningioma only "
        "which of the two is more probable. Tumours of another or an unstated type (`other_tumor`, `tumor`) "
        "never count toward a class accuracy. A subgroup with exactly the images of a row above is left out.",
        "",
        "Targets (judged on the point estimate):",
        "",
        *render_targets(targets),
        "",
    ]
    if any(name in last for name in ("external_test", "external_val")):
        for model, sets in sets_by_model.items():
            if len(sets_by_model) > 1:
                lines += [f"{model}:", ""]
            lines += [*external_summary_rows(sets), ""]
    for name in SUBGROUP_SETS:
        if name not in last:
            continue
        rows = {model: sets[name]["subgroups"] for model, sets in sets_by_model.items() if name in sets}
        lines += [
            f"{level}# {SET_TITLES[name]} ({last[name]['n_images']} images)",
            "",
            *render_table(rows),
            "",
        ]
    if figure:
        lines += [f"![tumour sensitivity and specificity per subgroup]({figure})", ""]
    return lines


#: The model card section that :func:`evaluate_published` writes with ``card``.
BY_EYE_HEADING = "## Sequences read by eye"
#: What a report says of its rows marked *(by eye)*.
BY_EYE_NOTE = (
    "Rows marked *(by eye)* group the external images whose sequence was read by eye (`{csv}`), where the "
    "manifest gives none: a hand label, not the source's, and the only FLAIR label this dataset has."
)


#: The contact sheet of the missed tumours and false alarms beside a report.
FAILURES_SHEET = "failures.png"


def external_failures(probabilities: np.ndarray, records: list[ManifestRecord], manifest_dir: Path) -> dict[str, Any]:
    """A model's missed tumours and false alarms on an external part, with their groups of near duplicates.

    Args:
        probabilities: the served (calibrated) probabilities of ``records``.
        records: the external part, as :func:`external_parts` gives it (each with its ``group``).
        manifest_dir: the manifest dataset's folder; the rows' paths are relative to it.

    Returns:
        ``{"manifest": folder as shown, "summary": sentence, "rows": failure rows}``
        (:mod:`braintumor_training.failures`).

    Raises:
        EvaluationError: when an image of ``records`` has no group (a split written without groups).
    """
    root = Path(manifest_dir).resolve()
    try:
        rows = failure_rows(probabilities, records, root=root)
    except ValueError as err:
        raise EvaluationError(f"{err}: split it again with this version") from err
    return {"manifest": _shown(root), "summary": failure_summary(rows, records), "rows": rows}


def failure_section(model: str, failures: dict[str, Any], sheet: Path | None) -> list[str]:
    """Markdown: a model's missed tumours and false alarms on the external test part, and their sheet.

    Args:
        model: how the report names the model (``version 6``, ``this run``).
        failures: :func:`external_failures`.
        sheet: the contact sheet beside the report, or ``None`` when there is nothing to show.
    """
    return [
        f"## Missed tumours and false alarms of {model} (external test part)",
        "",
        failures["summary"] + " A group holds images near-identical by perceptual hash (reprocessed copies, "
        "neighbouring slices that look alike): several missed slices of one group may be one missed lesion, "
        "while slices of one case that look different fall in different groups. Paths are relative to "
        f"`{failures['manifest']}`, numbered as on the sheet.",
        "",
        *render_failures(failures["rows"]),
        "",
        *([f"![missed tumours and false alarms]({sheet.name})", ""] if sheet else []),
    ]


def render_report(metrics: dict[str, Any]) -> str:
    """The evaluation report in Markdown."""
    fit = metrics.get("temperature_fit")
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
        *(
            [
                f"The validation the temperature was fitted on: {' + '.join(fit['sets'])}, {fit['n_images']} images, "
                f"{fit['n_tumor_only']} of them tumours whose type is not one of the classes; {fit['loss']}.",
                "",
            ]
            if fit and len(fit["sets"]) > 1
            else []
        ),
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
    if "targets" in metrics:
        sets_by_model = {}
        if "comparison" in metrics:
            sets_by_model[f"v{metrics['comparison']['version']}"] = metrics["comparison"]["sets"]
        sets_by_model["this run"] = {k: metrics[k] for k in SUBGROUP_SETS if k in metrics}
        if "comparison" in metrics:
            lines += [
                f"Compared with published version {metrics['comparison']['version']} on the same images, each "
                "version through its own preprocessing and with its own built-in temperature.",
                "",
            ]
        if metrics.get("sequences_by_eye"):
            lines += [BY_EYE_NOTE.format(csv=metrics["sequences_by_eye"]), ""]
        lines += subgroup_sections(sets_by_model, metrics["targets"], "subgroups.png")
    if "failures" in metrics:
        sheet = Path(FAILURES_SHEET) if metrics["failures"]["rows"] else None
        lines += failure_section("this run", metrics["failures"], sheet)
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path as reports show it: relative to the working folder (no machine-specific prefix)."""
    return os.path.relpath(Path(path).resolve())


def _labels(records: list[ImageRecord | ManifestRecord]) -> np.ndarray:
    return np.array([-1 if r.label_index is None else r.label_index for r in records], dtype=np.int32)


def version_preprocessing(version_dir: Path) -> Preprocessing:
    """A published version's own preprocessing (``preprocessing.json``; without it, a plain resize)."""
    path = Path(version_dir) / PREPROCESSING_FILE
    if path.exists():
        return Preprocessing.from_json(path.read_text())
    session = ort.InferenceSession(str(Path(version_dir) / MODEL_FILE), providers=["CPUExecutionProvider"])
    return Preprocessing(int(session.get_inputs()[0].shape[1]))


def score_version(
    version_dir: Path,
    sets: dict[str, tuple[Path, list[ImageRecord | ManifestRecord]]],
    pixels: dict[str, np.ndarray] | None = None,
    probabilities_out: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score image sets with a published version's ONNX model, through its own preprocessing.

    Args:
        version_dir: ``model_repository/<model>/<N>``.
        sets: by name (``test``, ``test_leak_free``, ``external_test``, ...): the data root (``/`` for
            manifest records, whose paths are absolute) and the records.
        pixels: already preprocessed pixels of some sets, made with this version's preprocessing.
        probabilities_out: when given, each set's served probabilities are put in it by name.

    Returns:
        :func:`~braintumor_training.subgroups.score_set` of each set, with the version's served (calibrated)
        probabilities.
    """
    session = ort.InferenceSession(str(Path(version_dir) / MODEL_FILE), providers=["CPUExecutionProvider"])
    preprocessing = version_preprocessing(version_dir)
    scored = {}
    for name, (root, records) in sets.items():
        if not records:
            continue
        x = pixels[name] if pixels and name in pixels else load_arrays(root, records, preprocessing=preprocessing)[0]
        probabilities = np.concatenate(
            [session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + ONNX_BATCH]})[0] for i in range(0, len(x), ONNX_BATCH)]
        )
        scored[name] = score_set(probabilities, _labels(records), records, external=name.startswith("external"))
        if probabilities_out is not None:
            probabilities_out[name] = probabilities
    return scored


def evaluate_published(
    version: int,
    split_file: Path,
    manifest_dir: Path,
    out: Path,
    data_dir: Path | None = None,
    repository: Path = DEFAULT_MODEL_REPOSITORY,
    model_name: str = MODEL_NAME,
    sequences_by_eye: Path | None = None,
    compare_version: int | None = None,
    card: bool = False,
) -> dict[str, Any]:
    """Subgroups of a published version on a run's external test part (and on Testing): a report in ``out``.

    Writes ``subgroups.json`` (summaries, subgroup rows and the version's missed tumours and false alarms on
    the external test part), ``subgroups.md``, the forest plot ``subgroups.png`` and the contact sheet of
    those images ``failures.png`` (:mod:`braintumor_training.failures`).

    Args:
        version: the published version.
        split_file: a run's ``external_split.json``: its ``test`` part is scored, never trained or tuned on.
        manifest_dir: the manifest dataset's folder.
        out: the report folder.
        data_dir: the folder dataset (its ``Testing`` split and, from the version's ``metrics.json``, the
            leak-free subset are scored too); ``None`` skips it.
        repository: the model repository.
        model_name: the model's name in it.
        sequences_by_eye: a hand-check CSV whose images are also reported by the sequence read by eye
            (:func:`external_parts`).
        compare_version: another published version scored on the same images (its own preprocessing and
            temperature), shown beside it; the targets are judged on ``version``.
        card: also put the rows of ``sequences_by_eye`` into the version's model card (section
            :data:`BY_EYE_HEADING`, replaced when it is there).

    Raises:
        EvaluationError: when a version or the split is missing, or the hand-check CSV cannot be used.
    """
    version_dir = Path(repository) / model_name / str(version)
    for v in (version, compare_version):
        if v is not None and not (Path(repository) / model_name / str(v) / MODEL_FILE).exists():
            raise EvaluationError(f"version {v} of {model_name} is not published in {repository}")
    if compare_version == version:
        raise EvaluationError(f"--compare-version {compare_version} is the version evaluated")
    if card and sequences_by_eye is None:
        raise EvaluationError("--card puts the sequences read by eye into the model card: give --sequences-by-eye")
    if card and not (version_dir / CARD_FILE).exists():
        raise EvaluationError(f"--card: version {version} has no {CARD_FILE} in {version_dir}")
    published = (
        json.loads((version_dir / "metrics.json").read_text()) if (version_dir / "metrics.json").exists() else {}
    )
    sets: dict[str, tuple[Path, list[ImageRecord | ManifestRecord]]] = {}
    if data_dir is not None:
        testing = scan_dataset(Path(data_dir), (TEST_SPLIT,))
        sets["test"] = (Path(data_dir), testing)
        leak_free = set(published.get("leak_free_test_images", []))
        clean = [r for r in testing if r.path in leak_free]
        if clean:  # the version's own audit of the same dataset
            sets["test_leak_free"] = (Path(data_dir), clean)
    external = external_parts(split_file, manifest_dir, ("test",), sequences_by_eye)["external_test"]
    sets["external_test"] = (Path("/"), external)
    by_model = {}
    if compare_version is not None:
        by_model[f"v{compare_version}"] = score_version(Path(repository) / model_name / str(compare_version), sets)
    served: dict[str, np.ndarray] = {}
    scored = score_version(version_dir, sets, probabilities_out=served)
    model = f"v{version}"
    by_model[model] = scored
    by_eye = sum(1 for r in external if r.sequence_by_eye)
    failures = external_failures(served["external_test"], external, manifest_dir)
    result = {
        "model": f"{model_name} version {version}",
        "version": version,
        "compare_version": compare_version,
        "sequences_by_eye": _shown(sequences_by_eye) if sequences_by_eye is not None else None,
        "compared_sets": (
            {name: compact(m) for name, m in by_model[f"v{compare_version}"].items()}
            if compare_version is not None
            else None
        ),
        "external_split": _shown(split_file),
        "manifest": _shown(manifest_dir),
        "data_dir": _shown(data_dir) if data_dir is not None else None,
        "preprocessing": version_preprocessing(version_dir).to_dict(),
        "sets": {name: compact(m) for name, m in scored.items()},
        "targets": check_targets(scored),
        "failures": failures,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "subgroups.json").write_text(json.dumps(result, indent=1))
    title = f"{model_name} version {version}" + (
        f" beside version {compare_version}" if compare_version is not None else ""
    )
    plot_forest(by_model, out / "subgroups.png", f"{title} by subgroup")
    lines = [
        f"# {title} by subgroup",
        "",
        f"The published ONNX model (`{_shown(version_dir / MODEL_FILE)}`) with its own preprocessing "
        f"(`{version_preprocessing(version_dir).to_json()}`) and built-in temperature, on the test part of the "
        f"external dataset `{_shown(manifest_dir)}` as `{_shown(split_file)}` splits it (never trained or tuned on)"
        + (f" and on the Testing split of `{_shown(data_dir)}`" if data_dir is not None else "")
        + ". A tumour is called when 1 − p(notumor) ≥ 0.5."
        + (
            f" Version {compare_version} is scored on the same images through its own preprocessing and "
            f"temperature; the targets are judged on version {version}."
            if compare_version is not None
            else ""
        ),
        "",
    ]
    if sequences_by_eye is not None:
        lines += [
            f"{by_eye} images of this test part were read by eye. " + BY_EYE_NOTE.format(csv=_shown(sequences_by_eye)),
            "",
        ]
    lines += subgroup_sections(by_model, result["targets"], "subgroups.png")
    sheet = failure_sheet(failures["rows"], out / FAILURES_SHEET, root=manifest_dir)
    lines += failure_section(f"version {version}", failures, sheet)
    (out / "subgroups.md").write_text("\n".join(lines))
    if card:
        by_eye_rows = {
            name: [r for r in sets["external_test"]["subgroups"] if r["grouping"] == "sequence_by_eye"]
            for name, sets in by_model.items()
        }
        intro = (
            f"Added after publication by `braintumor evaluate --version {version}"
            + (f" --compare-version {compare_version}" if compare_version is not None else "")
            + f" --external-split {_shown(split_file)} --external {_shown(manifest_dir)}"
            + f" --sequences-by-eye {_shown(sequences_by_eye)} --card`: the {by_eye} slices of the external test "
            "part whose sequence was read by eye, as the manifest gives none for them (a hand label, not the "
            "source's; the only FLAIR labels). Tumour sensitivity with 95 % Wilson intervals"
            + (f", version {compare_version} on the same images" if compare_version is not None else "")
            + f"; the whole report: `{_shown(out / 'subgroups.md')}`."
        )
        body = "\n".join(render_table(by_eye_rows, ("tumor_sensitivity",)))
        set_section(version_dir / CARD_FILE, BY_EYE_HEADING, intro, body)
    return result


def evaluate_run(
    run_dir: Path,
    data_dir: Path | None = None,
    tta: str = "none",
    compare_version: int | None = None,
    repository: Path = DEFAULT_MODEL_REPOSITORY,
    model_name: str = MODEL_NAME,
    sequences_by_eye: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run's best checkpoint; writes and returns ``evaluation/metrics.json``.

    Also writes ``report.md`` and its figures in ``evaluation/``; for a run with an external test part, its
    missed tumours and false alarms there (``failures`` in the metrics, a report section, ``failures.png``;
    :func:`external_failures`).

    Args:
        run_dir: the training run folder.
        data_dir: dataset root (default: the one recorded in the run's configuration).
        tta: test-time augmentation the served model will apply (``none`` or ``flip``); the temperature is
            fitted, and every figure computed, with it. Export builds the served model to match.
        compare_version: a published version to score on the same test images (its ONNX model, its own
            preprocessing), shown beside the run in the report, the figure and the model card.
        repository: the model repository holding ``compare_version``.
        model_name: the model's name in it.
        sequences_by_eye: a hand-check CSV whose external images are also reported by the sequence read by
            eye (:func:`external_parts`).
    """
    run_dir = Path(run_dir)
    config, audit = load_run(run_dir)
    if sequences_by_eye is not None and not config.get("external"):
        raise EvaluationError(f"--sequences-by-eye: {run_dir} was trained without a manifest dataset (--external)")
    data_dir = Path(data_dir or config["data_dir"])
    model = load_classifier(run_dir)
    size = int(config["image_size"])
    preprocessing = run_preprocessing(config)
    records: dict[str, list[ImageRecord | ManifestRecord]] = {
        **run_sets(data_dir, audit),
        **external_sets(run_dir, config, sequences_by_eye),
    }
    roots = {name: Path("/") if name.startswith("external") else data_dir for name in records}
    logits: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}  # test pixels, for a published version with the same preprocessing
    for name, chosen in records.items():
        pixels, labels[name] = load_arrays(roots[name], chosen, preprocessing=preprocessing)
        logits[name] = tta_logits(model, pixels.astype(np.float32), tta)
        if name in SUBGROUP_SETS and name != "external_val":
            kept[name] = pixels

    fit_sets = [name for name in ("validation", "external_val") if name in logits]
    fit_labels = np.concatenate([labels[name] for name in fit_sets])
    temperature = fit_temperature(np.concatenate([logits[name] for name in fit_sets]), fit_labels)
    metrics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data_dir": str(data_dir),
        "temperature": temperature,
        "temperature_fit": {
            "sets": fit_sets,
            "n_images": len(fit_labels),
            "n_tumor_only": int((fit_labels < 0).sum()),
            "loss": "the negative log-likelihood of each image's allowed classes (its class; 1 − p(notumor) "
            "for a tumour whose type is not one of the classes)",
        },
        "image_size": size,
        "tta": tta,
        "sequences_by_eye": _shown(sequences_by_eye) if sequences_by_eye is not None else None,
    }
    for name in logits:
        probabilities = calibrated(logits[name], temperature)
        if name in SUBGROUP_SETS:
            metrics[name] = score_set(probabilities, labels[name], records[name], external=name.startswith("external"))
        else:
            metrics[name] = classification_metrics(probabilities, labels[name])
        if name == "external_test":
            metrics["failures"] = external_failures(probabilities, records[name], Path(config["external"]))
    metrics["test_uncalibrated"] = classification_metrics(calibrated(logits["test"], 1.0), labels["test"])
    metrics["targets"] = check_targets(metrics)
    if compare_version is not None:
        version_dir = Path(repository) / model_name / str(compare_version)
        if not (version_dir / MODEL_FILE).exists():
            raise EvaluationError(f"version {compare_version} of {model_name} is not published in {repository}")
        same = version_preprocessing(version_dir) == preprocessing
        compared = score_version(
            version_dir,
            {name: (roots[name], records[name]) for name in kept},
            kept if same else None,
        )
        metrics["comparison"] = {
            "version": compare_version,
            "model": f"{model_name} version {compare_version}",
            "sets": {name: compact(m) for name, m in compared.items()},
            "targets": check_targets(compared),
        }

    out = run_dir / EVALUATION_DIR
    out.mkdir(exist_ok=True)
    for name in ("test", "test_leak_free"):
        _plot_confusion(
            np.array(metrics[name]["confusion_matrix"]),
            f"{name} (n={metrics[name]['n_images']})",
            out / f"confusion_{name}.png",
        )
    _plot_reliability(metrics["test_uncalibrated"], metrics["test"], out / "reliability.png")
    sets_by_model = {}
    if "comparison" in metrics:
        sets_by_model[f"v{compare_version}"] = metrics["comparison"]["sets"]
    sets_by_model["this run"] = {name: metrics[name] for name in SUBGROUP_SETS if name in metrics}
    plot_forest(sets_by_model, out / "subgroups.png", f"{run_dir.name}: tumour sensitivity and specificity by subgroup")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    failure_sheet(
        metrics.get("failures", {}).get("rows", []), out / FAILURES_SHEET, root=config.get("external") or None
    )
    (out / "report.md").write_text(render_report(metrics))
    return metrics
