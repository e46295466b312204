"""Int8 static quantization of the served ONNX model, published only where it holds against fp32.

:func:`quantize_model` runs ONNX Runtime's own tools: ``quant_pre_process`` (ONNX shape inference and
graph optimisation; the symbolic shape inference meant for transformers is skipped), then
``quantize_static`` in the QDQ format ONNX Runtime recommends for CPUs: uint8 activations, int8 weights per
output channel, ranges calibrated (percentile 99.999, which clips rare outliers that min/max would let
stretch a whole tensor's scale) on **training** images (Kaggle ``Training`` and the external dataset's
training part) made by the version's own preprocessing.

Kept in float (:func:`head_nodes`): everything after the last convolution, that is the hard swish of the
last convolution, the head that recomputes the logits and the Grad-CAM maps from the feature map
(:class:`~braintumor_training.model.GradCamHead`: global pooling, two small MatMuls, the closed-form gradient,
the per-class normalisation), the temperature and the softmax. That is about a tenth of the multiply-adds
(3.0 M of 31 M an image, most of it the Grad-CAM gradient), and int8 there would put rounding straight into
the logits (which the temperature then scales by 1/T) and into the Grad-CAM gradient.

:func:`judge` scores the fp32 and the int8 model on the same preprocessed images of every set the evaluation
reports (Kaggle Testing, its leak-free subset, the external test part) with the evaluation's own functions
(:func:`~braintumor_training.subgroups.score_set`), and compares every figure: the set-level metrics and, per
subgroup (source, sequence, source and sequence, finding or class), tumour sensitivity, specificity, class
accuracy and glioma-versus-meningioma accuracy. Int8 *holds* only if every one stays within
:data:`DEFAULT_TOLERANCE` (0.3 points) of fp32; :func:`refusal` names the worst figure otherwise. It also
measures the outputs' agreement (max |Δp|, top class, tumour call, Grad-CAM maps).

``python -m braintumor_training.quantize --version N ...`` quantizes a published version and writes the
comparison and an fp32-versus-int8 speed table (``docs/benchmarks/int8-v<N>.md`` and ``.json``);
``--publish`` then makes int8 that version's served ``model.onnx`` (the fp32 model stays beside it as
``model.fp32.onnx``), only where it holds. ``braintumor export RUN --int8`` does the same for a new version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from braintumor.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_MODEL_REPOSITORY,
    HEATMAP_NAME,
    INPUT_NAME,
    MODEL_NAME,
    NO_TUMOR_INDEX,
)
from braintumor.config import OUTPUT_NAME as PROBABILITIES_NAME
from braintumor.model_repository import MODEL_FILE, versions
from braintumor.preprocessing import Preprocessing
from braintumor_training.dataset import TEST_SPLIT, TRAIN_SPLIT, ImageRecord, load_arrays, scan_dataset
from braintumor_training.evaluate import external_parts, version_preprocessing
from braintumor_training.external import ManifestRecord
from braintumor_training.subgroups import PROPORTION_TITLES, PROPORTIONS, compact, row_label, score_set

#: Largest allowed change of any reported figure, int8 against fp32 (0.3 points).
DEFAULT_TOLERANCE = 0.003
#: Training images drawn (seeded) to calibrate the activation ranges.
DEFAULT_CALIBRATION_IMAGES = 512
#: Where the fp32 model stays in a version folder whose served ``model.onnx`` is int8.
FP32_FILE = "model.fp32.onnx"
#: The sets compared, in report order.
COMPARED_SETS = ("test", "test_leak_free", "external_test")
SET_TITLES = {"test": "Testing", "test_leak_free": "Testing, leak-free subset", "external_test": "external test part"}
#: Set-level metrics compared (where a set has them), beside every subgroup proportion.
#: (Tumour sensitivity and specificity are the ``all`` subgroup's, compared there with their own counts.)
SET_METRICS = ("accuracy", "macro_f1", "tumor_auc", "ece", "tumor_ece")
METRIC_TITLES = {
    **PROPORTION_TITLES,
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "tumor_sensitivity": "tumour sensitivity",
    "tumor_specificity": "specificity",
    "tumor_auc": "tumour ROC AUC",
    "ece": "ECE (top label)",
    "tumor_ece": "ECE (tumour probability)",
}
#: Calibration methods offered (``--calibration``); percentile is the default.
CALIBRATION_METHODS = {
    "percentile": CalibrationMethod.Percentile,
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
}
#: Images per ONNX Runtime call when scoring or calibrating.
BATCH = 32


class QuantizationError(RuntimeError):
    """Int8 cannot be made, or does not hold against fp32 (then nothing is published)."""


def check_settings(tolerance: float, calibration_images: int) -> None:
    """Refuse a negative tolerance or no calibration images before any work starts.

    Args:
        tolerance: the largest allowed change of a figure.
        calibration_images: how many training images calibrate.

    Raises:
        QuantizationError: naming the bad value.
    """
    if not tolerance >= 0:
        raise QuantizationError(f"the tolerance must be >= 0, got {tolerance}")
    if calibration_images <= 0:
        raise QuantizationError(f"the number of calibration images must be > 0, got {calibration_images}")


class PixelReader(CalibrationDataReader):
    """Feeds ONNX Runtime's calibration with batches of preprocessed uint8 pixels.

    Args:
        pixels: ``(n, size, size, 3)`` uint8, made by the version's preprocessing.
        batch_size: images per calibration batch.
    """

    def __init__(self, pixels: np.ndarray, batch_size: int = 16) -> None:
        if len(pixels) == 0:
            raise QuantizationError("no calibration images")
        # Equal batches: ONNX Runtime's histogram calibration (percentile, entropy) cannot stack uneven ones,
        # so a last, smaller batch is left out.
        batch_size = min(batch_size, len(pixels))
        self.used = len(pixels) - len(pixels) % batch_size
        self._batches = iter([pixels[i : i + batch_size] for i in range(0, self.used, batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as ONNX Runtime feeds it, or ``None`` when all were read."""
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float: every node that no convolution depends on.

    In the served graph that is what follows the last convolution: its activation, the Grad-CAM head, the
    temperature and the softmax (the squeeze-and-excitation blocks inside the backbone feed later
    convolutions and are quantized).

    Args:
        model: the fp32 ONNX model (after ``quant_pre_process``); its nodes must have names.
    """
    producer = {output: node for node in model.graph.node for output in node.output}
    upstream: set[str] = set()
    stack = [node for node in model.graph.node if node.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name in upstream:
            continue
        upstream.add(node.name)
        stack.extend(producer[name] for name in node.input if name in producer)
    return [node.name for node in model.graph.node if node.name not in upstream]


def quantize_model(
    fp32_path: Path, int8_path: Path, calibration: np.ndarray, method: str = "percentile"
) -> dict[str, Any]:
    """Static int8 quantization of an ONNX model with ONNX Runtime's tools.

    Args:
        fp32_path: the fp32 model.
        int8_path: where to write the int8 (QDQ) model.
        calibration: uint8 pixels of training images, through the version's preprocessing.
        method: ``percentile``, ``minmax`` or ``entropy`` (:data:`CALIBRATION_METHODS`).

    Returns:
        The settings used, for reports and the model card.

    Raises:
        QuantizationError: for an unknown method or no calibration images.
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    with tempfile.TemporaryDirectory(prefix="braintumor-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        for k, node in enumerate(model.graph.node):  # every node needs a name to be excluded by name
            node.name = node.name or f"unnamed_{node.op_type}_{k}"
        onnx.save(model, str(prepared))
        excluded = head_nodes(model)
        reader = PixelReader(calibration)
        quantize_static(
            str(prepared),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            nodes_to_exclude=excluded,
        )
    settings = {
        "tool": f"onnxruntime {ort.__version__} quantize_static (quant_pre_process first)",
        "format": "QDQ",
        "activations": "uint8 (per tensor)",
        "weights": "int8 (per output channel)",
        "calibration": method,
        "calibration_images": reader.used,
        "kept_in_float": "everything after the last convolution: its activation, the Grad-CAM head, the "
        "temperature, the softmax",
        "nodes_kept_in_float": len(excluded),
    }
    quantized = onnx.load(str(int8_path))
    present = {prop.key for prop in quantized.metadata_props}
    for prop in onnx.load(str(fp32_path), load_external_data=False).metadata_props:
        if prop.key not in present:
            quantized.metadata_props.add(key=prop.key, value=prop.value)
    quantized.metadata_props.add(key="precision", value="int8 (QDQ; uint8 activations, int8 per-channel weights)")
    onnx.save(quantized, str(int8_path))
    return settings


def run_model(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs of an ONNX model on ``pixels``: probabilities ``(n, 4)`` and heatmaps ``(n, 4, h, w)``.

    Args:
        path: the ONNX model.
        pixels: uint8 ``(n, size, size, 3)``.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runs = [
        session.run([PROBABILITIES_NAME, HEATMAP_NAME], {INPUT_NAME: pixels[i : i + BATCH]})
        for i in range(0, len(pixels), BATCH)
    ]
    return np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])


def output_agreement(
    reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """How closely the int8 outputs follow the fp32 ones on the same images.

    Args:
        reference: fp32 ``(probabilities, heatmaps)``.
        candidate: int8 ``(probabilities, heatmaps)``.

    Returns:
        ``images``; ``max_abs_diff`` and ``mean_abs_diff`` of the probabilities; ``top_class_agreement``;
        ``tumor_call_agreement`` (1 − p(notumor) ≥ 0.5 on both or neither); for the Grad-CAM map of the fp32
        top class: ``heatmap_max_abs_diff``, ``heatmap_mean_abs_diff`` and ``heatmap_peak_agreement`` (same
        hottest cell).
    """
    (p0, h0), (p1, h1) = reference, candidate
    n = len(p0)
    top = p0.argmax(axis=1)
    cams0, cams1 = h0[np.arange(n), top].reshape(n, -1), h1[np.arange(n), top].reshape(n, -1)
    return {
        "images": n,
        "max_abs_diff": float(np.abs(p1 - p0).max()),
        "mean_abs_diff": float(np.abs(p1 - p0).mean()),
        "top_class_agreement": float((p1.argmax(axis=1) == top).mean()),
        "tumor_call_agreement": float(((p0[:, NO_TUMOR_INDEX] <= 0.5) == (p1[:, NO_TUMOR_INDEX] <= 0.5)).mean()),
        "heatmap_max_abs_diff": float(np.abs(cams1 - cams0).max()),
        "heatmap_mean_abs_diff": float(np.abs(cams1 - cams0).mean()),
        "heatmap_peak_agreement": float((cams1.argmax(axis=1) == cams0.argmax(axis=1)).mean()),
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(float(value))


def figures(scored: Mapping[str, Any]) -> dict[tuple[str, str], tuple[float, int | None]]:
    """Every figure a scored set reports: ``{(row, metric): (value, n)}``.

    Args:
        scored: :func:`~braintumor_training.subgroups.score_set` of one set (or its
            :func:`~braintumor_training.subgroups.compact` form).

    Returns:
        The set-level :data:`SET_METRICS` under the row ``set`` (``n`` the set's images), then each subgroup
        row's :data:`~braintumor_training.subgroups.PROPORTIONS` under its label (``n`` the images counted);
        rows that repeat an earlier row's images are left out, as the reports leave them out.
    """
    found: dict[tuple[str, str], tuple[float, int | None]] = {}
    for key in SET_METRICS:
        if _finite(scored.get(key)):
            counted = "n_labelled" if key in ("accuracy", "macro_f1", "ece") and "n_labelled" in scored else "n_images"
            found[("set", key)] = (float(scored[key]), scored.get(counted))
    for row in scored.get("subgroups", []):
        if row.get("same_as"):
            continue
        for key in PROPORTIONS:
            cell = row.get(key)
            if cell:
                found[(row_label(row), key)] = (float(cell["value"]), int(cell["n"]))
    return found


def compare_sets(
    reference: Mapping[str, Mapping[str, Any]],
    candidate: Mapping[str, Mapping[str, Any]],
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Compare every figure of every set; int8 holds only if each stays within ``tolerance`` of fp32.

    Args:
        reference: fp32 scored sets by name.
        candidate: int8 scored sets by the same names.
        tolerance: the largest allowed absolute change of any figure (0.003 = 0.3 points).

    Returns:
        ``tolerance``; ``holds``; ``figures``: one row per figure (``set``, ``row``, ``metric``, ``n``,
        ``fp32``, ``int8``, ``delta``, ``within``); ``outside``: the rows beyond the tolerance, largest change
        first; ``worst``: the row with the largest change.

    Raises:
        QuantizationError: when the two sides do not hold the same sets and figures.
    """
    check_settings(tolerance, 1)
    if set(reference) != set(candidate):
        raise QuantizationError(f"sets differ: {sorted(reference)} against {sorted(candidate)}")
    rows = []
    for set_name in reference:
        before, after = figures(reference[set_name]), figures(candidate[set_name])
        if set(before) != set(after):
            raise QuantizationError(f"{set_name}: the two models report different figures")
        for (row, metric), (value, n) in before.items():
            delta = after[(row, metric)][0] - value
            rows.append(
                {
                    "set": set_name,
                    "row": row,
                    "metric": metric,
                    "n": n,
                    "fp32": value,
                    "int8": after[(row, metric)][0],
                    "delta": delta,
                    "within": abs(delta) <= tolerance + 1e-12,
                }
            )
    if not rows:
        raise QuantizationError("no figures to compare")
    outside = sorted((r for r in rows if not r["within"]), key=lambda r: -abs(r["delta"]))
    return {
        "tolerance": tolerance,
        "holds": not outside,
        "figures": rows,
        "outside": outside,
        "worst": max(rows, key=lambda r: abs(r["delta"])),
    }


def describe_figure(row: Mapping[str, Any]) -> str:
    """``external test part, sequence T2, tumour sensitivity 0.9286 → 0.9221 (−0.65 points)``.

    Args:
        row: a row of :func:`compare_sets`'s ``figures``.
    """
    where = SET_TITLES.get(row["set"], row["set"]) + ("" if row["row"] == "set" else f", {row['row']}")
    return (
        f"{where}, {METRIC_TITLES.get(row['metric'], row['metric'])} {row['fp32']:.4f} → {row['int8']:.4f} "
        f"({100 * row['delta']:+.2f} points)"
    )


def refusal(comparison: Mapping[str, Any]) -> str:
    """The one-line reason int8 does not hold: the worst figure, how many are outside, the tolerance.

    Args:
        comparison: :func:`compare_sets`'s result (``holds`` false).
    """
    outside = comparison["outside"]
    return (
        f"int8 does not hold against fp32: {describe_figure(outside[0])}, allowed ±{100 * comparison['tolerance']:.2f} "
        f"points ({len(outside)} of {len(comparison['figures'])} figures outside)"
    )


Scored = dict[str, tuple[np.ndarray, np.ndarray, Sequence[ImageRecord | ManifestRecord]]]


def judge(fp32_path: Path, int8_path: Path, sets: Scored, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Score both models on the same images of every set and compare them.

    Args:
        fp32_path: the fp32 model.
        int8_path: its int8 form.
        sets: by name (``test``, ``test_leak_free``, ``external_test``): ``(pixels, labels, records)``, the
            pixels made by the version's preprocessing.
        tolerance: see :func:`compare_sets`.

    Returns:
        ``comparison`` (:func:`compare_sets`), ``agreement`` (:func:`output_agreement` over every image once)
        and ``sets`` (each model's compact scored sets: headline metrics and subgroup rows).
    """
    scored: dict[str, dict[str, Any]] = {"fp32": {}, "int8": {}}
    outputs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"fp32": [], "int8": []}
    for name, (pixels, labels, records) in sets.items():
        if not len(records):
            continue
        for model, path in (("fp32", fp32_path), ("int8", int8_path)):
            probabilities, heatmaps = run_model(path, pixels)
            if not (name == "test_leak_free" and "test" in sets):  # its images are Testing's: counted once
                outputs[model].append((probabilities, heatmaps))
            scored[model][name] = score_set(probabilities, labels, records, external=name.startswith("external"))
    if not scored["fp32"]:
        raise QuantizationError("no images to compare the models on")
    both = {m: (np.concatenate([o[0] for o in v]), np.concatenate([o[1] for o in v])) for m, v in outputs.items()}
    return {
        "comparison": compare_sets(scored["fp32"], scored["int8"], tolerance),
        "agreement": output_agreement(both["fp32"], both["int8"]),
        "sets": {model: {name: compact(s) for name, s in by_name.items()} for model, by_name in scored.items()},
    }


def calibration_pixels(
    preprocessing: Preprocessing,
    data_dir: Path,
    external_train: Sequence[ManifestRecord] = (),
    limit: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = 0,
) -> np.ndarray:
    """A seeded sample of training images, preprocessed: Kaggle ``Training`` and the external training part.

    Args:
        preprocessing: the version's preprocessing.
        data_dir: the folder dataset (its ``Training`` split).
        external_train: the external dataset's training part (absolute paths).
        limit: how many images (all, when there are fewer).
        seed: the sample's seed.
    """
    if limit <= 0:
        raise QuantizationError(f"the number of calibration images must be > 0, got {limit}")
    pool: list[tuple[Path, ImageRecord | ManifestRecord]] = [
        (Path(data_dir), r) for r in scan_dataset(Path(data_dir), (TRAIN_SPLIT,))
    ]
    pool += [(Path("/"), r) for r in external_train]
    chosen = sorted(np.random.default_rng(seed).permutation(len(pool))[:limit].tolist())
    parts = []
    for root in {root for root, _ in pool}:
        records = [pool[i][1] for i in chosen if pool[i][0] == root]
        if records:
            parts.append(load_arrays(root, records, preprocessing=preprocessing)[0])
    return np.concatenate(parts)


def load_sets(preprocessing: Preprocessing, sets: Mapping[str, tuple[Path, Sequence[Any]]]) -> Scored:
    """Preprocess image sets: ``{name: (root, records)}`` to ``{name: (pixels, labels, records)}``.

    Args:
        preprocessing: the version's preprocessing.
        sets: the data root (``/`` for manifest records) and the records of each set.
    """
    loaded: Scored = {}
    for name, (root, records) in sets.items():
        if records:
            pixels, labels = load_arrays(root, records, preprocessing=preprocessing)
            loaded[name] = (pixels, labels, list(records))
    return loaded


def quantize_and_judge(
    fp32_path: Path,
    int8_path: Path,
    preprocessing: Preprocessing,
    data_dir: Path,
    sets: Scored,
    external_train: Sequence[ManifestRecord] = (),
    tolerance: float = DEFAULT_TOLERANCE,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    method: str = "percentile",
) -> dict[str, Any]:
    """Quantize ``fp32_path`` into ``int8_path`` (calibrated on training images) and judge it on ``sets``.

    Args:
        fp32_path: the fp32 model.
        int8_path: where the int8 model goes.
        preprocessing: the version's preprocessing.
        data_dir: the folder dataset (calibration uses its ``Training`` split).
        sets: the evaluated sets (:func:`load_sets`).
        external_train: the external dataset's training part, also used for calibration.
        tolerance: see :func:`compare_sets`.
        calibration_images: how many training images calibrate the ranges.
        method: the calibration method.

    Returns:
        :func:`judge`'s result with ``settings`` (:func:`quantize_model`) and the file sizes.
    """
    calibration = calibration_pixels(preprocessing, data_dir, external_train, calibration_images)
    settings = quantize_model(fp32_path, int8_path, calibration, method)
    result = judge(fp32_path, int8_path, sets, tolerance)
    result["settings"] = settings
    result["bytes"] = {"fp32": Path(fp32_path).stat().st_size, "int8": Path(int8_path).stat().st_size}
    return result


def published_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """What a version's ``metrics.json`` keeps of an int8 judgement (figures without the per-set copies).

    Args:
        result: :func:`quantize_and_judge`'s result.
    """
    comparison = result["comparison"]
    return {
        "served": "int8",
        "fp32_file": FP32_FILE,
        "settings": result["settings"],
        "bytes": result["bytes"],
        "tolerance": comparison["tolerance"],
        "holds": comparison["holds"],
        "worst": comparison["worst"],
        "agreement": result["agreement"],
        "figures": comparison["figures"],
        **({"speed": result["speed"]} if "speed" in result else {}),
    }


def card_section(summary: Mapping[str, Any]) -> list[str]:
    """The model card's section on the int8 model (Markdown lines).

    Args:
        summary: :func:`published_summary`'s result.
    """
    s, a, worst = summary["settings"], summary["agreement"], summary["worst"]
    lines = [
        "## Int8",
        "",
        f"The served `{MODEL_FILE}` is **int8**: static quantization with {s['tool']}, {s['format']} format, "
        f"{s['activations']} activations, {s['weights']} weights, ranges calibrated ({s['calibration']}) on "
        f"{s['calibration_images']} training images through this version's preprocessing; kept in float: "
        f"{s['kept_in_float']}. The fp32 model it was made from is `{summary['fp32_file']}` "
        f"({summary['bytes']['fp32'] / 1e6:.1f} MB; int8 {summary['bytes']['int8'] / 1e6:.1f} MB); the TF-Serving "
        "SavedModel stays fp32.",
        "",
        f"Judged against fp32 on the same images of every reported set and subgroup: every one of "
        f"{len(summary['figures'])} figures stays within ±{100 * summary['tolerance']:.2f} points (largest change: "
        f"{describe_figure(worst)}). Outputs on {a['images']} images: top class agrees on "
        f"{100 * a['top_class_agreement']:.2f} %, tumour call on {100 * a['tumor_call_agreement']:.2f} %, max |Δp| "
        f"{a['max_abs_diff']:.3f} (mean {a['mean_abs_diff']:.4f}); Grad-CAM map of the top class: mean |Δ| "
        f"{a['heatmap_mean_abs_diff']:.3f}, same hottest cell on {100 * a['heatmap_peak_agreement']:.1f} %.",
        "",
    ]
    speed = summary.get("speed")
    if speed:
        cells = ", ".join(f"batch {r['batch_size']} {r['int8_over_fp32']:.2f}×" for r in speed["ratios"])
        lines += [f"In-process throughput, int8 over fp32 (same run): {cells}.", ""]
    return lines


def render_report(result: Mapping[str, Any], title: str) -> str:
    """The Markdown report: verdict, settings, output agreement, per-set and per-subgroup deltas, speed.

    Args:
        result: :func:`quantize_and_judge`'s result (with ``speed`` when measured).
        title: the report's heading.
    """
    comparison, agreement, s = result["comparison"], result["agreement"], result["settings"]
    tolerance = 100 * comparison["tolerance"]
    verdict = (
        f"**holds**: every one of {len(comparison['figures'])} figures stays within ±{tolerance:.2f} points"
        if comparison["holds"]
        else f"**does not hold**: {len(comparison['outside'])} of {len(comparison['figures'])} figures move by "
        f"more than ±{tolerance:.2f} points; the worst: {describe_figure(comparison['outside'][0])}"
    )
    lines = [
        f"# {title}",
        "",
        f"Verdict: {verdict}.",
        "",
        f"Quantization: {s['tool']}, {s['format']}, {s['activations']} activations, {s['weights']} weights, "
        f"calibration {s['calibration']} on {s['calibration_images']} training images (Kaggle Training and the "
        f"external training part, seeded sample) through the version's preprocessing; kept in float: "
        f"{s['kept_in_float']} ({s['nodes_kept_in_float']} nodes). Size {result['bytes']['fp32'] / 1e6:.1f} MB → "
        f"{result['bytes']['int8'] / 1e6:.1f} MB.",
        "",
        f"Both models score the same preprocessed images; a figure is a set-level metric or a subgroup's proportion "
        f"(k/n of the subgroup: one image in a subgroup of n moves it by 100/n points, so a subgroup of fewer than "
        f"{math.ceil(1 / comparison['tolerance']) if comparison['tolerance'] else '∞'} images tolerates no changed "
        "answer at all).",
        "",
        "## Outputs",
        "",
        "| images | top class agrees | tumour call agrees | max abs Δp | mean abs Δp | Grad-CAM (top class) mean abs Δ "
        "| max abs Δ | same hottest cell |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {agreement['images']} | {100 * agreement['top_class_agreement']:.2f} % | "
        f"{100 * agreement['tumor_call_agreement']:.2f} % | {agreement['max_abs_diff']:.4f} | "
        f"{agreement['mean_abs_diff']:.4f} | {agreement['heatmap_mean_abs_diff']:.4f} | "
        f"{agreement['heatmap_max_abs_diff']:.4f} | {100 * agreement['heatmap_peak_agreement']:.1f} % |",
        "",
    ]
    if comparison["outside"]:
        lines += [
            "## Figures outside the tolerance",
            "",
            "| set | subgroup | metric | n | fp32 | int8 | Δ points |",
            "|---|---|---|---:|---:|---:|---:|",
            *(_figure_row(r) for r in comparison["outside"]),
            "",
        ]
    for set_name in COMPARED_SETS:
        rows = [r for r in comparison["figures"] if r["set"] == set_name]
        if not rows:
            continue
        lines += [
            f"## {SET_TITLES[set_name]} ({rows[0]['n']} images)",
            "",
            "| set | subgroup | metric | n | fp32 | int8 | Δ points |",
            "|---|---|---|---:|---:|---:|---:|",
            *(_figure_row(r) for r in rows),
            "",
        ]
    speed = result.get("speed")
    if speed:
        lines += ["## Speed", "", *render_speed(speed), ""]
    return "\n".join(lines)


def _figure_row(row: Mapping[str, Any]) -> str:
    mark = "" if row["within"] else " **✗**"
    return (
        f"| {SET_TITLES.get(row['set'], row['set'])} | {'(whole set)' if row['row'] == 'set' else row['row']} | "
        f"{METRIC_TITLES.get(row['metric'], row['metric'])} | {row['n'] if row['n'] is not None else ''} | "
        f"{row['fp32']:.4f} | {row['int8']:.4f} | {100 * row['delta']:+.2f}{mark} |"
    )


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render_speed(speed: Mapping[str, Any]) -> list[str]:
    """Markdown tables of :func:`measure_speed`'s result.

    Args:
        speed: its result.
    """
    lines = [
        f"In-process ONNX Runtime with the server's session options, models measured in turns in one run "
        f"({speed['seconds_per_point']:g} s a point); {speed.get('note', '')}.".replace("; .", "."),
        "",
        "| model | batch | images/s | p50 ms | throughput vs first row's model |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['version']} | {r['batch_size']} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['throughput_vs_first']:.2f}× |"
            for r in speed["versions"]
        ),
        "",
        "Throughput ratios (wall time, disturbed where the load exceeds the cores):",
        "",
        "| batch | int8 over fp32 | int8 over version 1 | fp32 over version 1 | target |",
        "|---:|---:|---:|---:|---|",
        *(
            f"| {r['batch_size']} | {r['int8_over_fp32']:.2f}× | {_ratio(r.get('int8_over_version_1'))} | "
            f"{_ratio(r.get('fp32_over_version_1'))} | {r.get('target', '')} |"
            for r in speed["ratios"]
        ),
        "",
        "CPU milliseconds per image on one thread (as each server instance runs; both outputs; median of "
        "calls taken in turns), which other work on the machine barely changes:",
        "",
        "| model | batch | CPU ms per image |",
        "|---|---:|---:|",
        *(f"| {r['model']} | {r['batch_size']} | {r['cpu_ms_per_image']:.2f} |" for r in speed.get("cpu", [])),
        "",
        "| batch | int8 over fp32 (images per CPU second) | int8 over version 1 |",
        "|---:|---:|---:|",
        *(
            f"| {r['batch_size']} | {_ratio(r.get('cpu_int8_over_fp32'))} | "
            f"{_ratio(r.get('cpu_int8_over_version_1'))} |"
            for r in speed["ratios"]
        ),
    ]
    return lines


def publish_int8(version_dir: Path, int8_path: Path, summary: Mapping[str, Any]) -> None:
    """Make int8 the served model of a published version, the fp32 model kept as :data:`FP32_FILE`.

    A copy of the version folder is changed and then swapped in, so a failure leaves the version as it was.

    Args:
        version_dir: ``model_repository/<model>/<N>``.
        int8_path: the int8 model (it must hold: see :func:`compare_sets`).
        summary: :func:`published_summary`'s result, added to ``metrics.json`` and the model card.

    Raises:
        QuantizationError: when the version is already int8 or the judgement does not hold.
    """
    version_dir = Path(version_dir)
    if not summary["holds"]:
        raise QuantizationError("refusing to publish an int8 model that does not hold against fp32")
    if (version_dir / FP32_FILE).exists():
        raise QuantizationError(f"{version_dir} already serves int8 ({FP32_FILE} is beside it)")
    staging = Path(tempfile.mkdtemp(prefix=f".int8-{version_dir.name}-", dir=version_dir.parent))
    old = version_dir.parent / f".old-{staging.name}"
    try:
        shutil.copytree(version_dir, staging, dirs_exist_ok=True)
        staging.chmod(0o755)
        (staging / MODEL_FILE).rename(staging / FP32_FILE)
        shutil.copyfile(int8_path, staging / MODEL_FILE)
        metrics_path = staging / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        metrics["int8"] = dict(summary)
        metrics_path.write_text(json.dumps(metrics, indent=1))
        card = staging / "model-card.md"
        text = card.read_text() if card.exists() else ""
        card.write_text(text.rstrip("\n") + "\n\n" + "\n".join(card_section(summary)))
        version_dir.rename(old)
        try:
            staging.rename(version_dir)
        except OSError:
            old.rename(version_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def cpu_cost(
    models: Mapping[str, Path], pixels: np.ndarray, batch_sizes: tuple[int, ...] = (1, 8, 32), rounds: int = 15
) -> list[dict[str, Any]]:
    """CPU milliseconds per image of each model on one thread, as each server instance runs (``cpu.pbtxt``).

    CPU time, unlike wall time, is barely changed by other work on the machine, so this ratio holds where
    throughput is disturbed. Models take turns; the median call counts.

    Args:
        models: ONNX files by name.
        pixels: images to send.
        batch_sizes: batch sizes measured.
        rounds: calls of each model at each batch size.

    Returns:
        One row per model and batch size: ``model``, ``batch_size``, ``cpu_ms_per_image``.
    """
    from braintumor_serving.bench import session_options

    sessions = {
        name: ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        for name, path in models.items()
    }
    times: dict[tuple[str, int], list[float]] = {(name, b): [] for name in models for b in batch_sizes}
    for batch_size in batch_sizes:
        batch = np.resize(pixels, (batch_size, *pixels.shape[1:]))
        for session in sessions.values():
            session.run([PROBABILITIES_NAME], {INPUT_NAME: batch})
        for _ in range(rounds):
            for name, session in sessions.items():
                start = time.process_time()
                session.run([PROBABILITIES_NAME, HEATMAP_NAME], {INPUT_NAME: batch})
                times[(name, batch_size)].append((time.process_time() - start) / batch_size)
    return [
        {"model": name, "batch_size": b, "cpu_ms_per_image": 1e3 * float(np.median(values))}
        for (name, b), values in times.items()
    ]


def measure_speed(
    fp32_path: Path,
    int8_path: Path,
    pixels: np.ndarray,
    seconds: float,
    baseline: Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
) -> dict[str, Any]:
    """fp32 against int8 in process, side by side in one run (and version 1 first, the targets' baseline).

    :func:`braintumor_serving.bench.bench_versions` measures the models in turns with the server's session
    options; this adds int8's throughput ratio to fp32, and to version 1, at each batch size.

    Args:
        fp32_path: the fp32 model.
        int8_path: the int8 model.
        pixels: images to send.
        seconds: per point.
        baseline: version 1's model, or ``None``.
        batch_sizes: batch sizes measured.
    """
    from braintumor_serving.bench import bench_versions

    models = {"version 1 (fp32)": baseline} if baseline is not None else {}
    models.update({"fp32": Path(fp32_path), "int8": Path(int8_path)})
    load_before = os.getloadavg()[0]
    results = bench_versions(models, pixels, seconds, batch_sizes)
    results["cpu"] = cpu_cost(models, pixels, batch_sizes)
    results["note"] = (
        f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores "
        "(above the core count, other work was running and the figures are disturbed)"
    )
    rows = {(r["version"], r["batch_size"]): r for r in results["versions"]}
    results["ratios"] = []
    for batch_size in batch_sizes:
        int8 = rows[("int8", batch_size)]["images_per_s"]
        ratio: dict[str, Any] = {
            "batch_size": batch_size,
            "int8_over_fp32": int8 / rows[("fp32", batch_size)]["images_per_s"],
        }
        cpu = {r["model"]: r["cpu_ms_per_image"] for r in results["cpu"] if r["batch_size"] == batch_size}
        ratio["cpu_int8_over_fp32"] = cpu["fp32"] / cpu["int8"]
        if baseline is not None:
            ratio["cpu_int8_over_version_1"] = cpu["version 1 (fp32)"] / cpu["int8"]
            ratio["int8_over_version_1"] = int8 / rows[("version 1 (fp32)", batch_size)]["images_per_s"]
            ratio["fp32_over_version_1"] = (
                rows[("fp32", batch_size)]["images_per_s"] / rows[("version 1 (fp32)", batch_size)]["images_per_s"]
            )
            if batch_size == 32:
                ratio["target"] = "int8 >= 1.5x version 1 (issue #14)"
        results["ratios"].append(ratio)
    return results


def quantize_for_export(
    fp32_path: Path,
    int8_path: Path,
    preprocessing: Preprocessing,
    data_dir: Path,
    test: tuple[np.ndarray, np.ndarray, Sequence[ImageRecord]],
    leak_free: Sequence[str],
    split_file: Path | None = None,
    manifest_dir: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> dict[str, Any]:
    """``braintumor export --int8``: quantize the new version's model and judge it on the run's test sets.

    Args:
        fp32_path: the exported fp32 model.
        int8_path: where the int8 model goes.
        preprocessing: the run's preprocessing.
        data_dir: the folder dataset.
        test: Testing's ``(pixels, labels, records)``, already preprocessed.
        leak_free: the leak-free subset's image paths (the run's audit).
        split_file: the run's ``external_split.json`` (its training part calibrates too, its test part is
            judged), or ``None`` for a run without a manifest dataset.
        manifest_dir: the manifest dataset.
        tolerance: see :func:`compare_sets`.
        calibration_images: how many training images calibrate.

    Returns:
        :func:`published_summary` of the judgement, which holds.

    Raises:
        QuantizationError: with :func:`refusal`'s message when int8 does not hold.
    """
    check_settings(tolerance, calibration_images)
    pixels, labels, records = test
    clean = np.array([r.path in set(leak_free) for r in records], dtype=bool)
    sets: Scored = {"test": test}
    if clean.any():
        sets["test_leak_free"] = (pixels[clean], labels[clean], [r for r, c in zip(records, clean, strict=True) if c])
    external_train: list[ManifestRecord] = []
    if split_file is not None and manifest_dir is not None:
        parts = external_parts(Path(split_file), Path(manifest_dir), ("train", "test"))
        external_train = parts["external_train"]
        sets.update(load_sets(preprocessing, {"external_test": (Path("/"), parts["external_test"])}))
    result = quantize_and_judge(
        fp32_path, int8_path, preprocessing, data_dir, sets, external_train, tolerance, calibration_images
    )
    if not result["comparison"]["holds"]:
        raise QuantizationError(refusal(result["comparison"]))
    return published_summary(result)


def _external_dir(split_file: Path) -> Path | None:
    config = Path(split_file).parent / "config.json"
    if config.exists():
        external = json.loads(config.read_text()).get("external")
        return Path(external) if external else None
    return None


def quantize_version(
    version: int,
    out: Path,
    data_dir: Path,
    split_file: Path | None = None,
    manifest_dir: Path | None = None,
    repository: Path = DEFAULT_MODEL_REPOSITORY,
    model_name: str = MODEL_NAME,
    tolerance: float = DEFAULT_TOLERANCE,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    method: str = "percentile",
    seconds: float = 5.0,
    publish: bool = False,
) -> dict[str, Any]:
    """Quantize a published version, judge it, write the report; with ``publish``, serve int8 where it holds.

    Writes ``out/int8-v<N>.md`` and ``out/int8-v<N>.json``.

    Args:
        version: the published version.
        out: the report folder.
        data_dir: the folder dataset (calibration: ``Training``; judged: ``Testing`` and its leak-free subset,
            as the version's ``metrics.json`` lists it).
        split_file: the version's run's ``external_split.json`` (calibration: its training part; judged: its
            test part), or ``None``.
        manifest_dir: the manifest dataset (default: the one of the run beside ``split_file``).
        repository: the model repository.
        model_name: the model's name in it.
        tolerance: see :func:`compare_sets`.
        calibration_images: how many training images calibrate.
        method: the calibration method.
        seconds: per speed point; 0 skips the speed measurement.
        publish: make int8 the version's served model where it holds.

    Raises:
        QuantizationError: when the version is missing, or with ``publish`` when int8 does not hold (the
            report is written all the same; the repository is left untouched).
    """
    check_settings(tolerance, calibration_images)
    version_dir = Path(repository) / model_name / str(version)
    if not (version_dir / MODEL_FILE).exists():
        raise QuantizationError(f"version {version} of {model_name} is not published in {repository}")
    if (version_dir / FP32_FILE).exists():
        raise QuantizationError(f"{version_dir} already serves int8 ({FP32_FILE} is beside it)")
    published = (
        json.loads((version_dir / "metrics.json").read_text()) if (version_dir / "metrics.json").exists() else {}
    )
    preprocessing = version_preprocessing(version_dir)
    testing = scan_dataset(Path(data_dir), (TEST_SPLIT,))
    leak_free = set(published.get("leak_free_test_images", []))
    chosen: dict[str, tuple[Path, Sequence[Any]]] = {
        "test": (Path(data_dir), testing),
        "test_leak_free": (Path(data_dir), [r for r in testing if r.path in leak_free]),
    }
    external_train: list[ManifestRecord] = []
    if split_file is not None:
        manifest_dir = manifest_dir or _external_dir(split_file)
        if manifest_dir is None:
            raise QuantizationError(f"say where the manifest dataset of {split_file} is (--external)")
        parts = external_parts(Path(split_file), Path(manifest_dir), ("train", "test"))
        external_train = parts["external_train"]
        chosen["external_test"] = (Path("/"), parts["external_test"])
    sets = load_sets(preprocessing, chosen)
    with tempfile.TemporaryDirectory(prefix="braintumor-int8-") as tmp:
        int8_path = Path(tmp) / MODEL_FILE
        result = quantize_and_judge(
            version_dir / MODEL_FILE,
            int8_path,
            preprocessing,
            Path(data_dir),
            sets,
            external_train,
            tolerance,
            calibration_images,
            method,
        )
        result["version"] = version
        if seconds > 0:
            first = Path(repository) / model_name / "1" / MODEL_FILE
            baseline = first if version != 1 and first.exists() else None
            result["speed"] = measure_speed(version_dir / MODEL_FILE, int8_path, sets["test"][0], seconds, baseline)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        title = f"Int8 against fp32: {model_name} version {version}"
        (out / f"int8-v{version}.md").write_text(render_report(result, title) + "\n")
        (out / f"int8-v{version}.json").write_text(json.dumps(result, indent=1))
        if publish:
            if not result["comparison"]["holds"]:
                raise QuantizationError(refusal(result["comparison"]) + f"; version {version} left as it was")
            publish_int8(version_dir, int8_path, published_summary(result))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor_training.quantize``: quantize a published version, report, optionally publish.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 2 on bad input, or with ``--publish`` when int8 does not hold (nothing published).
    """
    parser = argparse.ArgumentParser(
        prog="python -m braintumor_training.quantize",
        description="Static int8 quantization of a published version, judged against fp32 on every set and "
        "subgroup; --publish serves it where every figure stays within the tolerance.",
    )
    parser.add_argument("--version", type=int, default=None, help="published version (default: the latest)")
    parser.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="the folder dataset (Training, Testing)")
    parser.add_argument("--external-split", default=None, help="the version's run's external_split.json")
    parser.add_argument("--external", default=None, help="the manifest dataset (default: the run's)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest change, 0.003 = 0.3 points")
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    parser.add_argument("--calibration", choices=sorted(CALIBRATION_METHODS), default="percentile")
    parser.add_argument("--seconds", type=float, default=5.0, help="per speed point; 0 skips the speed table")
    parser.add_argument("--out", default="docs/benchmarks", help="folder for int8-v<N>.md and .json")
    parser.add_argument("--publish", action="store_true", help="serve int8 as the version's model.onnx where it holds")
    args = parser.parse_args(argv)
    from braintumor_training.dataset import DatasetError
    from braintumor_training.evaluate import EvaluationError

    model_dir = Path(args.repository) / args.model_name
    version = args.version if args.version is not None else (versions(model_dir) or [None])[-1]
    if version is None:
        print(f"quantize: no published version of {args.model_name} in {args.repository}", file=sys.stderr)
        return 2
    try:
        result = quantize_version(
            version,
            Path(args.out),
            Path(args.data),
            Path(args.external_split) if args.external_split else None,
            Path(args.external) if args.external else None,
            Path(args.repository),
            args.model_name,
            args.tolerance,
            args.calibration_images,
            args.calibration,
            args.seconds,
            args.publish,
        )
    except (QuantizationError, EvaluationError, DatasetError) as err:
        print(f"quantize: {err}", file=sys.stderr)
        return 2
    comparison = result["comparison"]
    print(
        f"version {version}: int8 "
        + ("holds" if comparison["holds"] else refusal(comparison).removeprefix("int8 "))
        + f"; report {args.out}/int8-v{version}.md"
        + (f"; published as {model_dir / str(version) / MODEL_FILE}" if args.publish else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
