"""``braintumor export``: publish an evaluated run as the next version of the served model.

Steps: check the run's evaluation against a quality gate; build the served model (uint8 pixels in,
temperature-scaled probabilities out); convert it to ONNX; verify ONNX Runtime against Keras on every
Testing image; write the SavedModel in the TF-Serving layout and check it with ``saved_model_cli``;
then move the new version into the model repository in one rename.
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
from braintumor_training.evaluate import EVALUATION_DIR, load_classifier, load_run, run_sets, summary_rows
from braintumor_training.model import build_served_model, feature_model
from braintumor_training.train import run_preprocessing

#: What each augmentation profile does, for the model card.
AUGMENTATION_DESCRIPTIONS = {
    "v1": "mild flip/rotation/zoom/brightness/contrast augmentation",
    "robust": "augmentation for what scanners vary and the preprocessing does not undo (flip, rotation, "
    "crops into the head, some zoom-out, aspect ratio, translation, gamma 0.5–2.2, MR bias field, noise, "
    "mild brightness/contrast)",
}
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
            "## How it was made",
            "",
            "```",
            run.get("sessions", [{}])[0].get("command", "braintumor train ..."),
            f"braintumor evaluate {metrics['run_dir']}" + (" --tta flip" if metrics.get("tta") == "flip" else ""),
            f"braintumor export {metrics['run_dir']}",
            "```",
            "",
            f"{epochs} epochs, {seconds / 60:.0f} minutes of training on {versions.get('cpus', '?')} CPU cores"
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
            + AUGMENTATION_DESCRIPTIONS[config.get("augmentation", "v1")]
            + ". "
            f"Calibration: temperature T = {metrics['temperature']:.4f} fitted on validation, built into the model."
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
            "## Known limitations",
            "",
            "- One public dataset of 2-D slices, already resized to 224×224 with the aspect ratio lost; "
            "no patient identifiers, so the split cannot be made by patient, and the leak-free subset only removes "
            "images that *look* alike.",
            "- Only four classes: other lesions (metastases, haemorrhage, post-operative changes) are outside its "
            "scope and will be forced into one of them.",
            "- Scanners, sequences and sites other than those in the dataset were not tested; accuracy may drop on "
            "them. Calibration was fitted on data from the same sources.",
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
) -> Path:
    """Publish ``run_dir`` as the next version of ``model_name``; returns the new version folder.

    ``served_versions`` (Triton's ``latest`` version policy) is written into the model configurations.

    Raises:
        ExportError: when the run is not evaluated, misses the gate, or fails verification.
    """
    run_dir = Path(run_dir)
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
    pixels, _ = load_arrays(data_dir, run_sets(data_dir, audit)["test"], preprocessing=preprocessing)

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
        tf_dir = Path(tfserving_base) / model_name / str(version)
        if tf_dir.exists():
            raise ExportError(f"{tf_dir} already exists: the TF-Serving base is out of step with the repository")
        tf_staging = staging / "saved_model"
        export_saved_model(served, tf_staging, classifier)
        for folder in (staging, tf_staging):
            (folder / PREPROCESSING_FILE).write_text(preprocessing.to_json() + "\n")

        published = {k: metrics[k] for k in ("validation", "test", "test_leak_free", "temperature", "image_size")}
        published["tta"] = metrics.get("tta", "none")
        published["export_parity"] = parity
        published["audit"] = {"near_duplicate_threshold": audit["threshold"], **audit["summary"]}
        published["leak_free_test_images"] = audit["leak_free_test"]
        published["training"] = {
            "total_train_seconds": run.get("total_train_seconds"),
            "commands": [x.get("command") for x in run.get("sessions", [])],
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
