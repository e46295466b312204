"""A small, fast MRI sequence classifier (T1, T1C, T2) on hand-made intensity features.

``brain-tumor-mri`` does not say which sequence each slice is; the manifest dataset ``mri-external``
does for its Feltrin slices (T1, T1 with contrast = T1C, T2). This module learns the sequence from those
labels, so that the audit can show how the folder dataset's classes spread over the sequences.

No network is trained: each slice goes through the project's shared preprocessing (head crop, intensity
stretch, 160 × 160) and is described by about a hundred cheap numbers (:func:`slice_features`): the
intensity histogram inside the head, a radial profile from the scalp inwards (scalp, skull, the fluid under
it, cortex), the share of dark and bright tissue, thin bright and dark structures (vessels, sulci) and large
bright or dark blobs (ventricles), mostly relative to the deep brain's median. A seeded gradient-boosting
classifier maps them to a sequence and answers :data:`UNCERTAIN` where its top probability is low.

Feltrin has no FLAIR label: a FLAIR slice is counted as whichever labelled sequence it resembles most.
FLAIR has dark fluid like T1 and bright lesions like T2; on ``brain-tumor-mri`` the hand check found that
FLAIR slices are nearly all counted as T1C, so the T1C column of an estimate holds the FLAIR slices too. A
hand-checked sample (:func:`read_hand_labels`, ``docs/audit/sequence-check.csv``) tells how many there are.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from braintumor.preprocessing import Preprocessing

#: The sequences the classifier learns: those labelled in ``mri-external`` (Feltrin).
LEARNED_SEQUENCES: tuple[str, ...] = ("T1", "T1C", "T2")
#: Sequences a hand label may name (FLAIR has no training label; ``other`` for anything else).
HAND_SEQUENCES: tuple[str, ...] = ("T1", "T1C", "T2", "FLAIR", "other")
#: The answer where the classifier's top probability is below its confidence threshold.
UNCERTAIN = "uncertain"
#: Default smallest top probability of a definite answer.
DEFAULT_MIN_CONFIDENCE = 0.6
#: The preprocessing the features are computed on: the project's shared one, head-cropped and stretched.
FEATURE_PREPROCESSING = Preprocessing(160, crop_to_head=True, normalize_intensity=True)

_SHELLS = (0.0, 0.06, 0.15, 0.3, 0.5, 0.75, 1.01)
_HIST_BINS = 16
#: Pixels (of 160) from the head's edge beyond which the brain counts as deep.
_DEEP = 24
#: Steps of 2 pixels in the radial profile from the head's edge.
_PROFILE_STEPS = 16


def head_mask(image: np.ndarray) -> np.ndarray:
    """The head in a preprocessed slice: tissue above 8 % of full scale, holes filled, specks removed.

    Args:
        image: 2-D ``uint8`` slice.
    """
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(image > 20, iterations=2))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    if mask.sum() < 0.05 * mask.size:  # no clear head: use the whole frame
        mask = np.ones_like(mask, dtype=bool)
    return mask


def slice_features(pixels: np.ndarray) -> np.ndarray:
    """Describe one preprocessed slice by cheap intensity numbers (``float32``, :data:`N_FEATURES` of them).

    Most numbers are relative to the median of the deep brain (more than 24 pixels inside the head's edge),
    so that the display window of a source matters less than the contrast between tissues, which is what
    tells the sequences apart: dark fluid and bright fat in T1, bright fluid in T2, bright vessels, dura and
    lesions in T1C.

    Args:
        pixels: a slice from :data:`FEATURE_PREPROCESSING`, ``(H, W)`` or ``(H, W, C)`` ``uint8``.

    Returns:
        In order: the head's area, mean and spread; a 16-bin intensity histogram and 5 percentiles inside
        the head; mean and 90th percentile of 6 shells from the scalp inwards (relative depth); shares of
        dark and bright brain; centre against brain and scalp against brain; small bright spots;
        edge strength; then, relative to the deep-brain median: 9 percentiles of the deep brain; a radial
        profile in 2-pixel steps from the head's edge and its extremes (scalp, skull, fluid under the
        skull, cortex); thin bright and thin dark structures (median-filter top-hats: vessels, sulci);
        large bright and dark blobs (ventricles); a 10-bin histogram; the deep brain's spread and level.
    """
    image = pixels[..., 0] if pixels.ndim == 3 else pixels
    x = image.astype(np.float32) / 255.0
    mask = head_mask(image)
    dist = ndimage.distance_transform_edt(mask)
    depth = dist / max(float(dist.max()), 1.0)
    smooth = ndimage.median_filter(x, size=7)
    inside = x[mask]

    # absolute intensities and relative-depth shells
    interior = x[depth >= 0.3] if (depth >= 0.3).sum() > 20 else inside
    centre = x[depth >= 0.6] if (depth >= 0.6).sum() > 20 else interior
    hist = np.histogram(inside, bins=_HIST_BINS, range=(0.0, 1.0))[0] / max(len(inside), 1)
    shells: list[float] = []
    for lo, hi in itertools.pairwise(_SHELLS):
        ring = x[mask & (depth >= lo) & (depth < hi)]
        shells += [ring.mean(), np.percentile(ring, 90)] if len(ring) else [0.0, 0.0]
    interior_mean = float(interior.mean())
    shares = [(interior < t).mean() for t in (0.15, 0.3)] + [(interior > t).mean() for t in (0.6, 0.75, 0.9)]
    ratios = [
        centre.mean() / (interior_mean + 1e-3),
        shells[0] / (interior_mean + 1e-3),  # scalp and skull against the brain
        np.percentile(centre, 90) - np.percentile(centre, 10),
    ]
    inner = depth >= 0.15
    spots = [((x - smooth)[inner] > t).mean() if inner.any() else 0.0 for t in (0.15, 0.3)]
    gy, gx = np.gradient(x)
    absolute = [
        [mask.mean(), inside.mean(), inside.std()],
        hist,
        np.percentile(inside, (5, 25, 50, 75, 95)),
        shells,
        shares,
        ratios,
        spots,
        [float(np.hypot(gx, gy)[mask].mean())],
    ]

    # relative to the deep brain's median
    deep = dist > _DEEP
    if deep.sum() < 100:
        deep = dist > 0.5 * dist.max()
    values = x[deep]
    quantiles = np.percentile(values, (1, 5, 10, 25, 50, 75, 90, 95, 99))
    level = quantiles[4] + 0.02
    steps = np.minimum((dist[mask] // 2).astype(int), _PROFILE_STEPS)
    counts = np.maximum(np.bincount(steps, minlength=_PROFILE_STEPS + 1), 1)
    profile = np.bincount(steps, weights=x[mask], minlength=_PROFILE_STEPS + 1) / counts / level
    extremes = [
        profile[:4].max(),  # scalp
        profile[2:10].min(),  # skull or fluid under it
        profile[4:14].max(),
        profile[4:14].max() - profile[2:10].min(),
        float(np.argmax(profile[:6])),
        float(np.argmin(profile[:10])),
    ]
    brain = dist > 8
    if brain.sum() < 100:
        brain = mask
    bright_thin = [((x - smooth)[brain] > t * level).mean() for t in (0.1, 0.2, 0.35)]
    dark_thin = [((smooth - x)[brain] > t * level).mean() for t in (0.1, 0.2, 0.35)]
    thin = [*bright_thin, *dark_thin, np.log((bright_thin[1] + 1e-3) / (dark_thin[1] + 1e-3))]
    blobs: list[float] = []
    for factor, bright in ((1.5, True), (2.0, True), (0.6, False), (0.4, False)):
        selected = deep & ((x > factor * level) if bright else (x < factor * level))
        opened = ndimage.binary_opening(selected, iterations=1)
        labels, n = ndimage.label(opened)
        largest = ndimage.sum_labels(opened, labels, np.arange(1, n + 1)).max() if n else 0.0
        blobs += [selected.sum() / deep.sum(), opened.sum() / deep.sum(), largest / deep.sum()]
    relative = [
        quantiles / level,
        profile,
        extremes,
        thin,
        blobs,
        np.histogram(values / level, bins=10, range=(0.0, 2.5))[0] / len(values),
        [float(values.std() / level), level],
    ]
    return np.concatenate([np.ravel(np.asarray(part, np.float64)) for part in (*absolute, *relative)]).astype(
        np.float32
    )


#: Length of a :func:`slice_features` vector.
N_FEATURES = len(slice_features(np.zeros((FEATURE_PREPROCESSING.size,) * 2, np.uint8)))


def image_features(path: Path | str) -> np.ndarray:
    """:func:`slice_features` of the image file at ``path`` after :data:`FEATURE_PREPROCESSING`."""
    return slice_features(FEATURE_PREPROCESSING(Path(path)))


def features_of(paths: Sequence[Path | str], workers: int = 2) -> np.ndarray:
    """The feature matrix ``(n, d)`` of ``paths``, decoded by ``workers`` threads."""
    if not paths:
        return np.zeros((0, N_FEATURES), np.float32)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return np.stack(list(pool.map(image_features, paths)))


def make_model(seed: int = 42, n_samples: int | None = None) -> Any:
    """The seeded, unfitted scikit-learn model behind :class:`SequenceClassifier` (gradient boosting).

    Args:
        seed: seed of the model.
        n_samples: size of the training set; a small one gets smaller leaves (at least 20 slices a leaf
            otherwise), so that a few dozen slices can still be learned.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    leaf = 20 if n_samples is None else int(min(20, max(3, n_samples // 20)))
    return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.08, min_samples_leaf=leaf, random_state=seed)


@dataclass
class SequenceClassifier:
    """Sequence of a slice from :func:`slice_features`, or :data:`UNCERTAIN` where the model hesitates.

    Args:
        min_confidence: smallest top probability of a definite answer.
        seed: seed of the model.
    """

    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    seed: int = 42
    model: Any = field(default=None, repr=False)

    def fit(self, features: np.ndarray, sequences: Sequence[str]) -> SequenceClassifier:
        """Fit on a feature matrix and its sequence labels; returns ``self``."""
        self.model = make_model(self.seed, len(sequences)).fit(np.asarray(features), np.asarray(sequences))
        return self

    @property
    def classes(self) -> list[str]:
        """The sequences the fitted model answers, in the order of :meth:`predict_proba`'s columns."""
        if self.model is None:
            raise RuntimeError("the sequence classifier is not fitted")
        return [str(c) for c in self.model.classes_]

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, len(classes))`` of each sequence."""
        if self.model is None:
            raise RuntimeError("the sequence classifier is not fitted")
        if len(features) == 0:
            return np.zeros((0, len(self.classes)))
        return self.model.predict_proba(np.asarray(features))

    def predict(self, features: np.ndarray, min_confidence: float | None = None) -> list[str]:
        """The most likely sequence of each row, or :data:`UNCERTAIN` below ``min_confidence``.

        Args:
            features: rows of :func:`slice_features`.
            min_confidence: overrides :attr:`min_confidence`; ``0`` always answers a sequence.
        """
        return decide(
            self.predict_proba(features),
            self.classes,
            self.min_confidence if min_confidence is None else min_confidence,
        )


def decide(probabilities: np.ndarray, classes: Sequence[str], min_confidence: float) -> list[str]:
    """The top class of each row of ``probabilities``, or :data:`UNCERTAIN` where it is below ``min_confidence``."""
    top = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
    confident = probabilities.max(axis=1) >= min_confidence if len(probabilities) else np.zeros(0, bool)
    return [classes[k] if ok else UNCERTAIN for k, ok in zip(top, confident, strict=True)]


@dataclass
class LabelledSlices:
    """Slices whose sequence is known, ready to fit and cross-validate a :class:`SequenceClassifier`.

    Args:
        paths: image files.
        sequences: the known sequence of each (one of :data:`LEARNED_SEQUENCES`).
        sources: the source dataset of each.
        groups: near-duplicate group of each (the audit's perceptual hash), for group-aware folds.
        features: the :func:`slice_features` matrix.
    """

    paths: list[str]
    sequences: list[str]
    sources: list[str]
    groups: np.ndarray
    features: np.ndarray


def labelled_slices(records: Sequence[Any], threshold: int | None = None, workers: int = 2) -> LabelledSlices:
    """The manifest records with a learned sequence, their features and their near-duplicate groups.

    Args:
        records: :class:`~braintumor_training.external.ManifestRecord` rows (others are skipped).
        threshold: near-duplicate Hamming distance (of 256 bits); default: the audit's.
        workers: decoding threads.
    """
    from braintumor_training.audit import (
        DEFAULT_NEAR_DUPLICATE_THRESHOLD,
        duplicate_groups,
        hamming_pairs,
        perceptual_hash,
    )

    kept = [r for r in records if r.sequence in LEARNED_SEQUENCES]
    paths = [str(r.path) for r in kept]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        hashes = np.array(list(pool.map(lambda p: perceptual_hash(Path(p)), paths))).reshape(len(paths), -1)
    pairs = hamming_pairs(hashes, DEFAULT_NEAR_DUPLICATE_THRESHOLD if threshold is None else threshold)
    return LabelledSlices(
        paths=paths,
        sequences=[r.sequence for r in kept],
        sources=[r.source for r in kept],
        groups=duplicate_groups(len(paths), pairs),
        features=features_of(paths, workers),
    )


def cross_validate(
    features: np.ndarray,
    sequences: Sequence[str],
    groups: np.ndarray,
    folds: int = 5,
    seed: int = 42,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> dict[str, Any]:
    """Group-aware, stratified k-fold cross-validation of :class:`SequenceClassifier`.

    Every group of near duplicates stays in one fold, so no slice is judged by a model that saw its copy.

    Args:
        features: rows of :func:`slice_features`.
        sequences: the true sequence of each row.
        groups: near-duplicate group of each row.
        folds: number of folds.
        seed: seed of the folds and of the models.
        min_confidence: threshold of a definite answer (for the coverage figures).

    Returns:
        ``{"folds", "n", "accuracy", "per_sequence": {seq: {"n", "accuracy"}}, "confusion": {true: {pred: n}},
        "confident_share", "confident_accuracy", "min_confidence"}``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(sequences)
    features = np.asarray(features)
    predicted = np.empty(len(y), dtype=object)
    confidence = np.zeros(len(y))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(features, y, groups):
        model = SequenceClassifier(min_confidence, seed).fit(features[train], y[train])
        proba = model.predict_proba(features[test])
        predicted[test] = np.asarray(model.classes)[proba.argmax(axis=1)]
        confidence[test] = proba.max(axis=1)
    labels = sorted(set(y.tolist()))
    confident = confidence >= min_confidence
    return {
        "folds": folds,
        "n": len(y),
        "accuracy": float((predicted == y).mean()),
        "per_sequence": {
            s: {"n": int((y == s).sum()), "accuracy": float((predicted[y == s] == s).mean())} for s in labels
        },
        "confusion": {s: {t: int(((y == s) & (predicted == t)).sum()) for t in labels} for s in labels},
        "confident_share": float(confident.mean()),
        "confident_accuracy": float((predicted[confident] == y[confident]).mean()) if confident.any() else 0.0,
        "min_confidence": min_confidence,
    }


def fit_classifier(
    external: Sequence[Path] | Iterable[Any],
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    seed: int = 42,
    workers: int = 2,
) -> tuple[SequenceClassifier, LabelledSlices]:
    """Fit a :class:`SequenceClassifier` on the labelled sequences of manifest datasets.

    Args:
        external: manifest dataset folders (``mri-external``), or their records already read.
        min_confidence: smallest top probability of a definite answer.
        seed: seed of the model.
        workers: decoding threads.

    Raises:
        ValueError: when the manifests label fewer than two of :data:`LEARNED_SEQUENCES`.
    """
    from braintumor_training.external import read_manifest

    records: list[Any] = []
    for item in external:
        records += read_manifest(Path(item), check_images=False) if isinstance(item, str | Path) else [item]
    data = labelled_slices(records, workers=workers)
    if len(set(data.sequences)) < 2:
        raise ValueError(f"the manifests label fewer than two of the sequences {', '.join(LEARNED_SEQUENCES)}")
    return SequenceClassifier(min_confidence, seed).fit(data.features, data.sequences), data


def estimate_sequences(
    paths: Sequence[Path | str],
    classifier: SequenceClassifier | None = None,
    external: Sequence[Path] = (),
    min_confidence: float | None = None,
    workers: int = 2,
) -> list[str]:
    """Estimate the sequence of each image: one of :data:`LEARNED_SEQUENCES` or :data:`UNCERTAIN`.

    Args:
        paths: the images.
        classifier: a fitted classifier; default: fit one on ``external``.
        external: manifest dataset folders to fit on when no classifier is given (default:
            ``../shared/data/mri-external`` beside the project).
        min_confidence: overrides the classifier's threshold of a definite answer.
        workers: decoding threads.
    """
    if classifier is None:
        from braintumor.config import DEFAULT_DATA_DIR

        classifier, _ = fit_classifier(external or [DEFAULT_DATA_DIR.parent / "mri-external"], workers=workers)
    return classifier.predict(features_of(list(paths), workers), min_confidence)


def read_hand_labels(path: Path, sample: str | None = None) -> dict[str, str]:
    """Hand labels of a sequence check: ``{relative path: sequence}`` from a CSV with ``path,sequence``.

    Args:
        path: the CSV (optional columns: ``sample``, ``index``, ``confidence``, ``note``).
        sample: keep only the rows whose ``sample`` column has this value.

    Raises:
        ValueError: on a missing column, a sequence outside :data:`HAND_SEQUENCES` or a path named twice,
            naming the line.
    """
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "sequence"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        labels: dict[str, str] = {}
        seen: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            if row["path"] in seen:
                raise ValueError(f"{path} line {line}: {row['path']} is already labelled on line {seen[row['path']]}")
            seen[row["path"]] = line
            if row["sequence"] not in HAND_SEQUENCES:
                expected = ", ".join(HAND_SEQUENCES)
                raise ValueError(
                    f"{path} line {line}: unknown sequence {row['sequence']!r}; expected one of {expected}"
                )
            if sample is None or row.get("sample") == sample:
                labels[row["path"]] = row["sequence"]
    return labels


def hand_check_samples(path: Path) -> list[str]:
    """The values of a hand-check CSV's ``sample`` column, in order of first appearance (none: ``[]``)."""
    with Path(path).open(newline="") as f:
        return list(dict.fromkeys(row["sample"] for row in csv.DictReader(f) if row.get("sample")))


def agreement(hand: dict[str, str], estimated: dict[str, str]) -> dict[str, Any]:
    """How the estimates agree with hand labels.

    Args:
        hand: ``{path: hand label}`` (:func:`read_hand_labels`).
        estimated: ``{path: estimate}`` (paths absent here are counted as missing).

    Returns:
        ``{"n", "missing", "confusion": {hand: {estimate: n}}, "comparable", "agree", "agreement",
        "agree_when_certain", "certain"}``: ``comparable`` counts the hand labels the classifier can answer
        (:data:`LEARNED_SEQUENCES`); FLAIR and ``other`` appear in the confusion table only.
    """
    rows = [h for h in HAND_SEQUENCES if h in hand.values()]
    columns = [*LEARNED_SEQUENCES, UNCERTAIN]
    confusion = {h: dict.fromkeys(columns, 0) for h in rows}
    missing = 0
    agree = comparable = certain = agree_certain = 0
    for path, label in hand.items():
        guess = estimated.get(path)
        if guess is None:
            missing += 1
            continue
        confusion[label][guess] = confusion[label].get(guess, 0) + 1
        if label in LEARNED_SEQUENCES:
            comparable += 1
            agree += guess == label
            if guess != UNCERTAIN:
                certain += 1
                agree_certain += guess == label
    return {
        "n": len(hand),
        "missing": missing,
        "confusion": confusion,
        "comparable": comparable,
        "agree": agree,
        "agreement": agree / comparable if comparable else 0.0,
        "certain": certain,
        "agree_when_certain": agree_certain / certain if certain else 0.0,
    }


def count_table(rows: Sequence[str], columns: Sequence[str]) -> dict[str, dict[str, int]]:
    """Cross-count two aligned label lists: ``{row label: {column label: n}}``, labels sorted by first sight."""
    table: dict[str, Counter] = {}
    for r, c in zip(rows, columns, strict=True):
        table.setdefault(r, Counter())[c] += 1
    return {r: dict(c) for r, c in table.items()}


def hand_check_sample(data_dir: Path, per_class: int | Mapping[str, int] = 12, seed: int = 13) -> list[str]:
    """A seeded random sample of a folder dataset's images for a hand check, class by class.

    Args:
        data_dir: root holding ``Training/`` and ``Testing/``.
        per_class: images drawn from each class (over both splits together), or a number per class.
        seed: seed of the draw.

    Returns:
        Paths relative to ``data_dir``, class by class (sorted by name), in drawing order.
    """
    from braintumor_training.dataset import scan_dataset

    records = scan_dataset(Path(data_dir))
    rng = np.random.default_rng(seed)
    sample: list[str] = []
    for label in sorted({r.label for r in records}):
        n = per_class if isinstance(per_class, int) else per_class.get(label, 0)
        paths = sorted(r.path for r in records if r.label == label)
        sample += [paths[i] for i in rng.choice(len(paths), size=min(n, len(paths)), replace=False)]
    return sample


def contact_sheet(paths: Sequence[Path], out: Path, first_index: int = 1, columns: int = 4, tile: int = 240) -> Path:
    """Write a PNG montage of ``paths`` (grey, cropped to the head, aspect kept, not stretched), tiles numbered.

    Args:
        paths: the images, in order.
        out: the PNG to write.
        first_index: number of the first tile (the numbers match the hand-check CSV's ``index``).
        columns: tiles per row.
        tile: side of a tile in pixels.
    """
    from braintumor.preprocessing import head_box, load_image, to_grey

    rows = -(-len(paths) // columns)
    sheet = Image.new("L", (columns * tile, rows * tile), 0)
    draw = ImageDraw.Draw(sheet)
    for k, path in enumerate(paths):
        grey = to_grey(load_image(path))
        grey = grey.crop(head_box(grey))
        grey = grey.resize(
            (round(grey.width * (tile - 4) / max(grey.size)), round(grey.height * (tile - 4) / max(grey.size)))
        )
        grey.thumbnail((tile - 4, tile - 4), Image.Resampling.BILINEAR)
        x, y = (k % columns) * tile, (k // columns) * tile
        sheet.paste(grey, (x + (tile - grey.width) // 2, y + (tile - grey.height) // 2))
        draw.rectangle((x, y, x + 30, y + 18), fill=0)
        draw.text((x + 3, y + 3), str(first_index + k), fill=255)
        draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=90)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out
