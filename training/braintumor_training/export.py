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
    ROUTING_VERSION_BASE,
    SERVED_VERSIONS,
    next_version,
    versions,
)
from braintumor_serving.model_config import write_model_files
from braintumor_training.dataset import load_arrays
from braintumor_training.evaluate import (
    EVALUATION_DIR,
    load_classifier,
    load_run,
    run_sets,
)
from braintumor_training.model import build_served_model, feature_model
from braintumor_training.model_card import earlier_phases, render_model_card
from braintumor_training.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_TOLERANCE,
    FP32_FILE,
    QuantizationError,
    card_section,
    check_settings,
    quantize_for_export,
)
from braintumor_training.serving_rule import RuleError, ServingRule, describe
from braintumor_training.serving_rule import card_section as rule_card_section
from braintumor_training.train import EXTERNAL_SPLIT_FILE, run_preprocessing

#: Keys of a run's evaluation that are published in the version's ``metrics.json`` when present.
OPTIONAL_PUBLISHED = ("temperature_fit", "external_val", "external_test", "targets", "comparison")
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


def judge_rule(metrics: dict[str, Any], model_dir: Path, rule: Path, against: int | None) -> dict[str, Any]:
    """Judge an evaluated run by a serving rule against a published version; prints each condition.

    Args:
        metrics: the run's ``evaluation/metrics.json``.
        model_dir: the model's folder in the repository.
        rule: the rule file.
        against: the published version to compare with (default: the latest).

    Raises:
        ExportError: the rule cannot be read or applied, the version is not published, or the rule is not met.
    """
    published = [v for v in versions(model_dir) if v < ROUTING_VERSION_BASE]
    if not published:
        raise ExportError(
            f"refusing to publish: no version of {model_dir.name} is published yet, so the serving rule has nothing "
            "to judge the run against (publish the first without --rule); nothing was published"
        )
    version = against if against is not None else published[-1]
    if version not in published:
        raise ExportError(
            f"refusing to publish: version {version} of {model_dir.name} is not published, so the serving rule has "
            "nothing to judge the run against; nothing was published"
        )
    try:
        served = json.loads((model_dir / str(version) / "metrics.json").read_text())
    except (OSError, ValueError) as err:
        raise ExportError(
            f"refusing to publish: cannot read version {version}'s metrics.json ({err}); nothing was published"
        ) from err
    try:
        result = ServingRule.from_file(rule).judge(metrics, served, version)
    except RuleError as err:
        raise ExportError(f"refusing to publish: {err}; nothing was published") from err
    lines = describe(result)
    print(f"Serving rule {rule} against version {version}:")
    for line in lines:
        print(f"  {line}")
    if not result["met"]:
        unmet = [line for line, r in zip(lines, result["conditions"], strict=True) if not r["met"]]
        raise ExportError(
            f"refusing to publish: the serving rule {rule} is not met against version {version}: "
            + "; ".join(unmet)
            + "; nothing was published"
        )
    return result


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
    rule: Path | None = None,
    against: int | None = None,
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
        rule: a serving rule file (:mod:`braintumor_training.serving_rule`): the run is published only if it
            meets it on validation against ``against``; the result is kept in the version's ``metrics.json``
            and model card.
        against: the published version the rule compares with (default: the latest, which Triton serves by
            default).

    Raises:
        ExportError: when the run is not evaluated, misses the gate, fails verification, (with ``int8``) its
            int8 model does not hold against fp32, or (with ``rule``) the rule cannot be read or applied, the
            version to judge against is not published, or the run does not meet the rule; ``rule`` and ``int8``
            together are refused.
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
    if rule is not None and int8:
        raise ExportError(
            "refusing to publish: --rule judges the fp32 model's validation figures and --int8 would serve another "
            "model, which is not scored on validation; publish fp32 by the rule, then int8 where it holds; nothing "
            "was published"
        )
    rule_result = judge_rule(metrics, Path(repository) / model_name, rule, against) if rule is not None else None

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
        if rule_result is not None:
            published["serving_rule"] = rule_result
        published["audit"] = {"near_duplicate_threshold": audit["threshold"], **audit["summary"]}
        published["leak_free_test_images"] = audit["leak_free_test"]
        published["training"] = {
            "total_train_seconds": run.get("total_train_seconds"),
            "commands": [x.get("command") for x in run.get("sessions", [])],
            "earlier_phases": earlier_phases(config),
        }
        (staging / "metrics.json").write_text(json.dumps(published, indent=1))
        previous = model_dir / str(version - 1) / "metrics.json"
        card = render_model_card(
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
        if rule_result is not None:  # why it is served, before what it cannot do
            head, limitations, tail = card.partition("\n## Known limitations")
            card = head + "\n" + "\n".join(rule_card_section(rule_result)) + limitations + tail
        (staging / "model-card.md").write_text(
            card + ("\n" + "\n".join(card_section(int8_summary)) if int8_summary is not None else "")
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
