"""``braintumor export``: publish an evaluated run as the next version of the served model.

Steps: check the run's evaluation against a quality gate; build the served model (uint8 pixels in,
temperature-scaled probabilities out); convert it to ONNX; verify ONNX Runtime against Keras on every
Testing image; with ``--int8``, quantize it and judge int8 against fp32 on every test set and subgroup
(:mod:`braintumor_training.quantize`), refusing unless it holds; write the SavedModel in the TF-Serving layout
and check it with ``saved_model_cli``; then move the new version into the model repository in one rename.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf

from braintumor.config import HEATMAP_NAME, INPUT_NAME, LABELS, MODEL_NAME, OUTPUT_NAME
from braintumor.model_repository import (
    MODEL_FILE,
    PREPROCESSING_FILE,
    SERVED_VERSIONS,
    next_version,
    write_model_files,
)
from braintumor.preprocessing import Preprocessing
from braintumor_training.dataset import load_arrays
from braintumor_training.evaluate import (
    EVALUATION_DIR,
    external_summary_rows,
    load_classifier,
    load_run,
    run_sets,
    summary_rows,
)
from braintumor_training.model import build_served_model, feature_model
from braintumor_training.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_TOLERANCE,
    FP32_FILE,
    QuantizationError,
    card_section,
    check_settings,
    quantize_for_export,
)
from braintumor_training.subgroups import find_row, format_proportion, render_table, render_targets
from braintumor_training.train import EXTERNAL_SPLIT_FILE, run_preprocessing

#: What each augmentation profile does, for the model card.
AUGMENTATION_DESCRIPTIONS = {
    "v1": "mild flip/rotation/zoom/brightness/contrast augmentation",
    "robust": "augmentation for what scanners vary and the preprocessing does not undo (flip, rotation, "
    "crops into the head, some zoom-out, aspect ratio, translation, gamma 0.5–2.2, MR bias field, noise, "
    "mild brightness/contrast)",
    "sequence": "the robust augmentation plus what another MRI sequence does to tissue contrast (a random, not "
    "necessarily monotone intensity remapping; an inversion of the head's intensities), so that the shape of a "
    "lesion, not the brightness of fluid, decides",
}
#: Keys of a run's evaluation that are published in the version's ``metrics.json`` when present.
OPTIONAL_PUBLISHED = ("temperature_fit", "external_val", "external_test", "targets", "comparison")
#: The manifest dataset's sources, for the model card.
EXTERNAL_SOURCES = (
    "*Brain Tumor MRI Images 44 classes* (Feltrin): slices of Radiopaedia cases, T1, T1 with contrast and T2, "
    "gliomas, meningiomas, other tumour types and normal slices; Radiopaedia publishes under **CC BY-NC-SA "
    "3.0** (non-commercial use only, attribution, share-alike: a model or data derived from it must be "
    "shared under the same terms)",
    "*Br35H :: Brain Tumor Detection 2020*, its tumour half (type not given; mixed sequences, about a third T2 "
    "and a quarter FLAIR); published for research on Kaggle (its normal half is already in the Kaggle set)",
)
#: The served model's outputs, in order.
SERVED_OUTPUTS = [OUTPUT_NAME, HEATMAP_NAME]
#: Largest allowed difference between ONNX Runtime and Keras outputs.
PARITY_TOLERANCE = 1e-4
#: Largest allowed difference between ONNX Runtime and Keras Grad-CAM maps (scaled to [0, 1]).
HEATMAP_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The run cannot be published (not evaluated, below the quality gate, or failed verification)."""


@dataclass(frozen=True)
class QualityGate:
    """The least a model must reach on the run's evaluation to be published.

    Args:
        min_accuracy: accuracy on the full Testing split.
        min_leak_free_accuracy: accuracy on the leak-free Testing subset.
        min_tumor_sensitivity: tumor-vs-no-tumor sensitivity on the full Testing split.
    """

    min_accuracy: float = 0.95
    min_leak_free_accuracy: float = 0.93
    min_tumor_sensitivity: float = 0.97

    def failures(self, metrics: dict[str, Any]) -> list[str]:
        """Each criterion the metrics miss, as a readable sentence (empty when the gate passes)."""
        checks = [
            ("accuracy on Testing", metrics["test"]["accuracy"], self.min_accuracy),
            ("accuracy on the leak-free subset", metrics["test_leak_free"]["accuracy"], self.min_leak_free_accuracy),
            ("tumor sensitivity on Testing", metrics["test"]["tumor_sensitivity"], self.min_tumor_sensitivity),
        ]
        return [f"{name} {value:.4f} < required {bound:.4f}" for name, value, bound in checks if value < bound]


def _rename_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    renames = {output.name: name for output, name in zip(model.graph.output, names, strict=True)}
    for node in model.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
    for output in model.graph.output:
        output.name = renames[output.name]


def export_onnx(served: keras.Model, path: Path, metadata: dict[str, str]) -> None:
    """Convert the served model to ONNX with named input and output and metadata properties."""
    size = served.input_shape[1]
    served(np.zeros((1, size, size, 3), dtype=np.uint8))  # Keras exports only models that have been called
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        served.export(str(raw), format="onnx", verbose=False)
        model = onnx.load(str(raw))
    if model.graph.input[0].name != INPUT_NAME:
        raise ExportError(f"ONNX input is named {model.graph.input[0].name!r}, expected {INPUT_NAME!r}")
    _rename_outputs(model, SERVED_OUTPUTS)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def verify_parity(served: keras.Model, onnx_path: Path, pixels: np.ndarray) -> dict[str, float]:
    """Run Keras and ONNX Runtime on the same pixels; raise unless they agree.

    Raises:
        ExportError: when any argmax differs or the largest difference exceeds :data:`PARITY_TOLERANCE`.
    """
    expected_p, expected_h = served.predict(pixels, batch_size=64, verbose=0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    runs = [session.run(SERVED_OUTPUTS, {INPUT_NAME: pixels[i : i + 64]}) for i in range(0, len(pixels), 64)]
    got_p = np.concatenate([r[0] for r in runs])
    got_h = np.concatenate([r[1] for r in runs])
    max_diff = float(np.abs(got_p - expected_p).max())
    heatmap_diff = float(np.abs(got_h - expected_h).max())
    mismatches = int((got_p.argmax(1) != expected_p.argmax(1)).sum())
    if mismatches or max_diff > PARITY_TOLERANCE or heatmap_diff > HEATMAP_TOLERANCE:
        raise ExportError(
            f"ONNX differs from Keras on {len(pixels)} Testing images: {mismatches} different predictions, "
            f"max |Δp| = {max_diff:.2e} (allowed {PARITY_TOLERANCE:.0e}), max heatmap difference "
            f"{heatmap_diff:.2e} (allowed {HEATMAP_TOLERANCE:.0e})"
        )
    return {
        "images": len(pixels),
        "max_abs_diff": max_diff,
        "argmax_mismatches": mismatches,
        "heatmap_max_abs_diff": heatmap_diff,
    }


def export_saved_model(served: keras.Model, path: Path, classifier: keras.Model | None = None) -> str:
    """Write a TF SavedModel with a ``serving_default`` signature and check it with ``saved_model_cli``.

    With ``classifier``, two more endpoints let anyone differentiate the exported Keras model with
    ``tf.GradientTape`` (this is how the tests check the served Grad-CAM): ``features`` (uint8 pixels to
    the last convolution's map) and ``head_logits`` (that map to the class logits).

    Returns:
        What ``saved_model_cli show`` printed for the signature.
    """
    size = served.input_shape[1]
    pixels_spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)
    archive = keras.export.ExportArchive()
    archive.track(served)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda image: dict(zip(SERVED_OUTPUTS, served(image, training=False), strict=True)),
        input_signature=[pixels_spec],
    )
    if classifier is not None:
        features = feature_model(classifier)
        dense, logits = classifier.get_layer("head_dense"), classifier.get_layer("logits")
        archive.track(features)
        archive.track(classifier)
        archive.add_endpoint(
            name="features",
            fn=lambda image: features(tf.cast(image, tf.float32), training=False),
            input_signature=[pixels_spec],
        )
        archive.add_endpoint(
            name="head_logits",
            fn=lambda maps: logits(dense(tf.reduce_mean(maps, axis=(1, 2)))),
            input_signature=[tf.TensorSpec([None, *features.output_shape[1:]], tf.float32, name="features")],
        )
    archive.write_out(str(path), verbose=False)
    cli = shutil.which("saved_model_cli", path=str(Path(sys.executable).parent)) or shutil.which("saved_model_cli")
    command = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    shown = subprocess.run(
        [*command, "show", "--dir", str(path), "--tag_set", "serve", "--signature_def", "serving_default"],
        capture_output=True,
        text=True,
        check=False,
    )
    text = shown.stdout
    expected = [
        f"inputs['{INPUT_NAME}']",
        "DT_UINT8",
        f"outputs['{OUTPUT_NAME}']",
        "DT_FLOAT",
        f"(-1, {size}, {size}, 3)",
        f"(-1, {len(LABELS)})",
        f"outputs['{HEATMAP_NAME}']",
    ]
    missing = [e for e in expected if e not in text]
    if shown.returncode != 0 or missing:
        raise ExportError(
            f"saved_model_cli does not show the expected signature (missing {missing}):\n{text}{shown.stderr[-2000:]}"
        )
    return text


def describe_preprocessing(preprocessing: Preprocessing) -> str:
    """One phrase saying what a version's preprocessing does (for its model card)."""
    steps = ["decode, convert to 8-bit grey"]
    if preprocessing.crop_to_head:
        steps.append("crop to the head (borders, off-centre framing and pixel aspect undone)")
    if preprocessing.normalize_intensity:
        steps.append("stretch the 1st–99.5th intensity percentiles to 0–255 (brightness and contrast undone)")
    steps.append(f"resize to {preprocessing.size}×{preprocessing.size} (bilinear)")
    return ", ".join(steps) + f" (`{PREPROCESSING_FILE}`: `{preprocessing.to_json()}`)"


def compare_with_previous(version: int, metrics: dict[str, Any], previous: dict[str, Any] | None) -> list[str]:
    """Markdown lines comparing the clean results with the previous version's published ones."""
    if not previous:
        return []
    lines = [
        f"Against version {version - 1} (clean images; Δ in points):",
        "",
        "| set | accuracy | Δ | tumor sensitivity | Δ | tumor specificity | Δ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("test", "test_leak_free"):
        now, before = metrics[name], previous[name]
        cells = []
        for key in ("accuracy", "tumor_sensitivity", "tumor_specificity"):
            cells += [f"{now[key]:.4f}", f"{100 * (now[key] - before[key]):+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    loss = 100 * (previous["test_leak_free"]["accuracy"] - metrics["test_leak_free"]["accuracy"])
    verdict = "met" if loss <= 0.5 + 1e-9 else "**not met**"
    lines += ["", f"No loss of more than 0.5 points of leak-free accuracy against version {version - 1}: {verdict}."]
    return [*lines, ""]


#: The external subgroups whose tumour sensitivity the card names: (name, grouping, subgroup).
SCREENED_SUBGROUPS = (
    ("T1", "sequence", "T1"),
    ("T1C", "sequence", "T1C"),
    ("T2", "sequence", "T2"),
    ("Br35H", "source", "br35h"),
)


def _screening_figures(sets: dict[str, Any]) -> str:
    """``T1 0.935 (…), …, Br35H …, its specificity …``: the tumour sensitivity of each screened subgroup."""
    sensitivities = ", ".join(
        f"{name} {_cell(sets, grouping, subgroup)}" for name, grouping, subgroup in SCREENED_SUBGROUPS
    )
    return f"{sensitivities}, its specificity {_cell(sets, 'all', 'all', 'specificity')}"


def _cell(sets: dict[str, Any] | None, grouping: str, subgroup: str, key: str = "tumor_sensitivity") -> str:
    """One proportion of one external-test subgroup, formatted, or ``–``."""
    row = find_row(sets["external_test"]["subgroups"], grouping, subgroup) if sets and "external_test" in sets else None
    return format_proportion(row.get(key) if row else None)


def subgroup_card_sections(metrics: dict[str, Any], version: int, config: dict[str, Any]) -> list[str]:
    """Model card sections for a run judged on a manifest dataset (empty for older runs).

    "Where it works and where it does not" (targets, and the external test part's subgroups with their
    intervals, beside the compared version's), the shortcut found in version 2, and how to read the class
    when the tumour type is not one of the four.

    Args:
        metrics: the run's evaluation.
        version: the version being published.
        config: the run's configuration.
    """
    if "external_test" not in metrics:
        return []
    comparison = metrics.get("comparison")
    mine = {k: metrics[k] for k in ("test", "test_leak_free", "external_test") if k in metrics}
    models: dict[str, dict[str, Any]] = {}
    if comparison:
        models[f"v{comparison['version']}"] = comparison["sets"]
    models[f"v{version}" if f"v{version}" not in models else "this version"] = mine
    external = metrics["external_test"]
    lines = [
        "## Where it works and where it does not",
        "",
        f"Judged on the test part of the external data ({external['n_images']} slices the model never trained on "
        "and that chose nothing: not the temperature, not the checkpoint), split from its training part by "
        "near-duplicate group, and on Testing by class. Proportions with 95 % Wilson intervals; a tumour is "
        "called when the tumour probability is ≥ 0.5"
        + (
            f"; version {comparison['version']} scored on the same images with its own preprocessing"
            if comparison
            else ""
        )
        + ".",
        "",
        "Targets (set after version 2's shortcut was found; judged on the point estimate, its interval beside it):",
        "",
        *render_targets(metrics.get("targets", [])),
        "",
    ]
    for name, sets in models.items():
        if len(models) > 1:
            lines += [f"{name}:", ""]
        lines += [*external_summary_rows(sets, ("external_test",)), ""]
    proportions = ("tumor_sensitivity", "specificity", "class_accuracy")
    lines += [
        "External test part, by source, sequence and finding (class accuracy: gliomas and meningiomas, top class "
        "of the four):",
        "",
        *render_table({name: sets["external_test"]["subgroups"] for name, sets in models.items()}, proportions),
        "",
    ]
    if "subgroups" in metrics.get("test", {}):
        lines += [
            "Testing (Kaggle), by class:",
            "",
            *render_table(
                {name: sets["test"]["subgroups"] for name, sets in models.items() if "test" in sets},
                ("tumor_sensitivity", "specificity", "class_accuracy"),
            ),
            "",
        ]
    lines += [
        f"The forest plot of these intervals is the run's `{EVALUATION_DIR}/subgroups.png`.",
        "",
        "## The shortcut found in version 2",
        "",
        "In the Kaggle *Brain Tumor MRI Dataset* almost every tumour slice is T1 with contrast, and its T2 and "
        "FLAIR slices are nearly all in `notumor`. Version 2 learned that shortcut: bright fluid meant no "
        "tumour. It scored well on Testing, which shares the shortcut, and was never tested on other sources.",
    ]
    earlier = comparison["sets"] if comparison and comparison["version"] == 2 else None
    if earlier:
        lines[-1] += (
            " On the external test part its tumour sensitivity was "
            + _screening_figures(earlier)
            + " (95 % intervals)."
        )
    else:
        lines[-1] += " Its figures on the external test part: `docs/v2/external/subgroups.md`."
    lines += [
        "",
        f"Version {version} trains on the external training part too (tumours on T1, T2 and FLAIR)"
        + (
            ", with augmentation that changes tissue contrast as another sequence would"
            if config.get("augmentation") == "sequence"
            else ""
        )
        + ": on the same images its tumour sensitivity is "
        + _screening_figures(mine)
        + "."
        + (
            ""
            if find_row(external["subgroups"], "sequence", "FLAIR")
            else " FLAIR has no labelled test slices of its own (Br35H mixes sequences without saying which)."
        ),
        "",
        "## Reading the class when the tumour type is not one of the four",
        "",
        "The model knows four classes. A tumour of another type (schwannoma, metastasis, medulloblastoma, "
        "...) or of a type nobody gave was trained and is judged only on the **tumour probability** "
        "(1 − p(notumor)): that is the output to read. The class the model names for it is only the nearest of "
        "glioma, meningioma and pituitary, not a diagnosis of its type; such images never count toward a class "
        "accuracy above.",
        "",
    ]
    return lines


def earlier_phases(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The training phases a run continued (``--init-from``), oldest first: command, epochs and seconds of each.

    Args:
        config: the run's ``config.json``.
    """
    phases: list[dict[str, Any]] = []
    source = config.get("init_from")
    while source:
        run_dir = Path(source).parent
        try:
            run = json.loads((run_dir / "run.json").read_text())
            previous = json.loads((run_dir / "config.json").read_text())
        except FileNotFoundError:
            phases.insert(0, {"command": f"(weights of {source}; its run folder is gone)", "epochs": 0, "seconds": 0})
            break
        sessions = run.get("sessions", [])
        phases.insert(
            0,
            {
                "command": sessions[0].get("command", "braintumor train ...") if sessions else "braintumor train ...",
                "epochs": sum(x.get("epochs_run", 0) for x in sessions),
                "seconds": run.get("total_train_seconds", 0.0),
            },
        )
        source = previous.get("init_from")
    return phases


def render_model_card(
    model_name: str,
    version: int,
    metrics: dict[str, Any],
    run: dict[str, Any],
    audit: dict[str, Any],
    config: dict[str, Any],
    parity: dict[str, float],
    gate: QualityGate,
    previous: dict[str, Any] | None = None,
) -> str:
    """The model card published with a version (``previous``: the published metrics of the version before)."""
    sessions = run.get("sessions", [])
    seconds = run.get("total_train_seconds", 0.0)
    last = sessions[-1] if sessions else {}
    versions = last.get("versions", {})
    s = audit["summary"]
    test, clean = metrics["test"], metrics["test_leak_free"]
    targets = [
        ("accuracy on Testing ≥ 0.98", test["accuracy"] >= 0.98),
        ("accuracy on the leak-free subset ≥ 0.97", clean["accuracy"] >= 0.97),
        (
            "tumor sensitivity ≥ 0.99 at specificity ≥ 0.97 (Testing, threshold 0.5)",
            test["tumor_sensitivity"] >= 0.99 and test["tumor_specificity"] >= 0.97,
        ),
    ]
    epochs = sum(x.get("epochs_run", 0) for x in sessions)
    earlier = earlier_phases(config)
    return "\n".join(
        [
            f"# Model card: {model_name}, version {version}",
            "",
            "## What it is",
            "",
            f"A 4-class brain MRI slice classifier ({', '.join(LABELS)}): Keras MobileNetV3Small trained from "
            "scratch (no pretrained weights)"
            + (f" starting from `{config['weights']}`" if config.get("weights") else "")
            + f", input {config['image_size']}×{config['image_size']} grey pixels repeated over 3 channels (uint8, "
            "scaled inside the model) made by the shared preprocessing: "
            + describe_preprocessing(run_preprocessing(config))
            + "; output temperature-calibrated class probabilities and, for every class, a "
            "Grad-CAM map over the last convolution's grid (scaled to [0, 1]) showing where the evidence for that "
            "class lies. The tumor probability is 1 − p(notumor).",
            "",
            "## Intended use",
            "",
            "Research and clinical **decision support** only: it is **not a diagnostic device**, it is not "
            "cleared or approved by any regulator, and it must not be the basis of a diagnosis or treatment. A "
            "qualified reader reviews every scan; the model's output is a second opinion to prioritise or "
            "double-check, never a substitute.",
            "",
            "## Data",
            "",
            "Kaggle *Brain Tumor MRI Dataset* (Nickparvar, CC0; compiled from figshare, SARTAJ and Br35H), "
            "224×224 JPEG slices. The audit (perceptual hashing, 256-bit pHash, distance ≤ "
            f"{audit['threshold']}) found {s['exact_duplicate_groups']} groups of exact duplicates and "
            f"{s['test_images_with_near_duplicate_in_training']} of {s['test_images']} Testing images with a near "
            f"duplicate in Training. Validation ({s['val_images']} images) was split from Training (stratified, "
            f"seed {config['seed']}) keeping near-duplicate groups on one side; the model trained on "
            f"{last.get('train_images', s['train_images'])} images. Results are reported on the full Testing split "
            f"and on its leak-free subset ({clean['n_images']} images with no near duplicate in Training).",
            "",
            *(
                [
                    "Also trained on, and judged on, a second dataset of slices from other sources and sequences "
                    f"(`{config['external']}`, its test part {metrics['external_test']['n_images']} images), split by "
                    "near-duplicate group into training, validation and test parts. Its two sources:",
                    "",
                    *[f"- {source}." for source in EXTERNAL_SOURCES],
                    "",
                    "Use them for research and evaluation only; name both sources wherever this model is described.",
                    "",
                ]
                if "external_test" in metrics and config.get("external")
                else []
            ),
            "## How it was made",
            "",
            "```",
            *[phase["command"] for phase in earlier],
            run.get("sessions", [{}])[0].get("command", "braintumor train ..."),
            f"braintumor evaluate {metrics['run_dir']}"
            + (" --tta flip" if metrics.get("tta") == "flip" else "")
            + (f" --compare-version {metrics['comparison']['version']}" if "comparison" in metrics else ""),
            f"braintumor export {metrics['run_dir']}",
            "```",
            "",
            "".join(
                f"A first phase ran {phase['epochs']} epochs in {phase['seconds'] / 60:.0f} minutes; the next started "
                "from its best checkpoint with a new warm-up and cosine cycle. "
                for phase in earlier
            )
            + f"{epochs} epochs, {seconds / 60:.0f} minutes of training on {versions.get('cpus', '?')} CPU cores"
            + (
                f" in {len(sessions)} sessions (" + "; ".join(str(x.get("finished")) for x in sessions[:-1]) + ")"
                if len(sessions) > 1
                else ""
            )
            + " "
            f"(TensorFlow {versions.get('tensorflow', '?')}, Keras {versions.get('keras', '?')}); batch "
            f"{config['batch_size']}, AdamW (peak learning rate {config['learning_rate']}, weight decay "
            f"{config['weight_decay']}), warm-up then cosine decay, label smoothing {config['label_smoothing']}, "
            "balanced class weights, BatchNorm momentum 0.9, "
            + AUGMENTATION_DESCRIPTIONS.get(
                config.get("augmentation", "v1"), f"{config.get('augmentation')} augmentation"
            )
            + ". "
            f"Calibration: temperature T = {metrics['temperature']:.4f} fitted on validation"
            + (
                " (Kaggle validation and the external validation part; a tumour of no class counts with the "
                "likelihood of 1 − p(notumor))"
                if len(metrics.get("temperature_fit", {}).get("sets", [])) > 1
                else ""
            )
            + ", built into the model."
            + (
                " Test-time augmentation, built into the model: the mean logits of the image and of its left-right "
                "mirror (twice the compute of one pass; the Grad-CAM maps are those of the image as sent)."
                if metrics.get("tta") == "flip"
                else ""
            ),
            "",
            "## Results",
            "",
            *summary_rows(metrics),
            "",
            f"Tumor ROC AUC on Testing {test.get('tumor_auc', float('nan')):.4f}, on the leak-free subset "
            f"{clean.get('tumor_auc', float('nan')):.4f}. Per-class figures are in `metrics.json`.",
            "",
            "Targets set for version 1:",
            "",
            *[f"- {name}: {'met' if ok else '**not met**'}" for name, ok in targets],
            "",
            *compare_with_previous(version, metrics, previous),
            f"Export checks: ONNX Runtime equals Keras on {parity['images']} Testing images (max |Δp| "
            f"{parity['max_abs_diff']:.1e}, {parity['argmax_mismatches']} different predictions; Grad-CAM maps "
            f"within {parity.get('heatmap_max_abs_diff', float('nan')):.1e}); quality gate "
            f"(accuracy ≥ {gate.min_accuracy}, leak-free accuracy ≥ {gate.min_leak_free_accuracy}, tumor "
            f"sensitivity ≥ {gate.min_tumor_sensitivity}) passed.",
            "",
            *subgroup_card_sections(metrics, version, config),
            "## Known limitations",
            "",
            "- One public dataset of 2-D slices, already resized to 224×224 with the aspect ratio lost; "
            "no patient identifiers, so the split cannot be made by patient, and the leak-free subset only removes "
            "images that *look* alike.",
            "- Only four classes: other lesions (metastases, haemorrhage, post-operative changes) are outside its "
            "scope and will be forced into one of them.",
            (
                "- Tested on two sources besides the Kaggle set (see *Where it works and where it does not*); other "
                "scanners, sites and sequences remain untested, and the external data's labels are per case, not "
                "per slice (a slice at the edge of a tumour may show little of it)."
                if "external_test" in metrics
                else "- Scanners, sequences and sites other than those in the dataset were not tested; accuracy may "
                "drop on them. Calibration was fitted on data from the same sources."
            ),
            "- A whole scan is a series of slices; the model judges one slice at a time.",
            *(
                [
                    "- The crop to the head looks for the largest bright region on a dark background; on an image "
                    "without a dark background it keeps the whole image, and a bright object beside the head as "
                    "large as a tenth of it widens the crop.",
                ]
                if run_preprocessing(config).crop_to_head
                else []
            ),
            "",
        ]
    )


def export_run(
    run_dir: Path,
    repository: Path,
    tfserving_base: Path,
    model_name: str = MODEL_NAME,
    gate: QualityGate = QualityGate(),
    data_dir: Path | None = None,
    served_versions: int = SERVED_VERSIONS,
    int8: bool = False,
    int8_tolerance: float = DEFAULT_TOLERANCE,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> Path:
    """Publish ``run_dir`` as the next version of ``model_name``; returns the new version folder.

    Args:
        run_dir: the evaluated training run.
        repository: the model repository.
        tfserving_base: the TF-Serving model base (``deploy/tfserving/models``).
        model_name: the model's name.
        gate: the quality gate.
        data_dir: the folder dataset (default: the run's).
        served_versions: Triton's ``latest`` version policy, written into the model configurations.
        int8: serve a static int8 quantization of the model (:mod:`braintumor_training.quantize`) as
            ``model.onnx``, the fp32 model kept as ``model.fp32.onnx``; refused, with nothing published, unless
            every figure of every test set and subgroup stays within ``int8_tolerance`` of fp32.
        int8_tolerance: the largest allowed change of any figure (0.003 = 0.3 points).
        calibration_images: training images that calibrate the int8 ranges.

    Raises:
        ExportError: when the run is not evaluated, misses the gate, fails verification, or (with ``int8``)
            its int8 model does not hold against fp32.
    """
    run_dir = Path(run_dir)
    if int8:
        try:
            check_settings(int8_tolerance, calibration_images)
        except QuantizationError as err:
            raise ExportError(f"refusing to publish: {err}; nothing was published") from err
    metrics_path = run_dir / EVALUATION_DIR / "metrics.json"
    if not metrics_path.exists():
        raise ExportError(f"{run_dir} has no evaluation: run `braintumor evaluate {run_dir}` first")
    metrics = json.loads(metrics_path.read_text())
    failures = gate.failures(metrics)
    if failures:
        raise ExportError("refusing to publish: the model is below the quality gate: " + "; ".join(failures))

    config, audit = load_run(run_dir)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    data_dir = Path(data_dir or config["data_dir"])
    classifier = load_classifier(run_dir)
    served = build_served_model(classifier, metrics["temperature"], tta=metrics.get("tta", "none"))
    preprocessing = run_preprocessing(config)
    test_records = run_sets(data_dir, audit)["test"]
    pixels, test_labels = load_arrays(data_dir, test_records, preprocessing=preprocessing)

    model_dir = Path(repository) / model_name
    version = next_version(model_dir)
    Path(repository).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{model_name}-{version}-", dir=Path(repository).parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a served version must be world-readable
    try:
        onnx_path = staging / MODEL_FILE
        export_onnx(
            served,
            onnx_path,
            {
                "labels": ",".join(LABELS),
                "image_size": str(config["image_size"]),
                "temperature": f"{metrics['temperature']:.6f}",
                "version": str(version),
                "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        parity = verify_parity(served, onnx_path, pixels)
        int8_summary = None
        if int8:
            int8_path = staging / "model.int8.onnx"
            try:
                int8_summary = quantize_for_export(
                    onnx_path,
                    int8_path,
                    preprocessing,
                    data_dir,
                    (pixels, test_labels, test_records),
                    audit["leak_free_test"],
                    run_dir / EXTERNAL_SPLIT_FILE if config.get("external") else None,
                    Path(config["external"]) if config.get("external") else None,
                    int8_tolerance,
                    calibration_images,
                )
            except QuantizationError as err:
                raise ExportError(
                    f"refusing to publish: {err}; nothing was published (without --int8 the fp32 model would be)"
                ) from err
            onnx_path.rename(staging / FP32_FILE)
            int8_path.rename(onnx_path)
        tf_dir = Path(tfserving_base) / model_name / str(version)
        if tf_dir.exists():
            raise ExportError(f"{tf_dir} already exists: the TF-Serving base is out of step with the repository")
        tf_staging = staging / "saved_model"
        export_saved_model(served, tf_staging, classifier)
        for folder in (staging, tf_staging):
            (folder / PREPROCESSING_FILE).write_text(preprocessing.to_json() + "\n")

        published = {k: metrics[k] for k in ("validation", "test", "test_leak_free", "temperature", "image_size")}
        published["tta"] = metrics.get("tta", "none")
        published.update({k: metrics[k] for k in OPTIONAL_PUBLISHED if k in metrics})
        published["export_parity"] = parity
        if int8_summary is not None:
            published["int8"] = int8_summary
        published["audit"] = {"near_duplicate_threshold": audit["threshold"], **audit["summary"]}
        published["leak_free_test_images"] = audit["leak_free_test"]
        published["training"] = {
            "total_train_seconds": run.get("total_train_seconds"),
            "commands": [x.get("command") for x in run.get("sessions", [])],
            "earlier_phases": earlier_phases(config),
        }
        (staging / "metrics.json").write_text(json.dumps(published, indent=1))
        previous = model_dir / str(version - 1) / "metrics.json"
        (staging / "model-card.md").write_text(
            render_model_card(
                model_name,
                version,
                metrics,
                run,
                audit,
                config,
                parity,
                gate,
                json.loads(previous.read_text()) if previous.exists() else None,
            )
            + ("\n" + "\n".join(card_section(int8_summary)) if int8_summary is not None else "")
        )

        heatmap_size = int(served.output_shape[1][2])
        write_model_files(
            model_dir, model_name, int(config["image_size"]), heatmap_size, served_versions, {version: preprocessing}
        )
        tf_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tf_staging), tf_dir)
        (staging).rename(model_dir / str(version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir / str(version)
