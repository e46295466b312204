"""Dataset audit: integrity, class balance, image formats, and exact and near-duplicate images.

Near duplicates are found with a perceptual hash (``imagehash.phash`` at 16×16, 256 bits): two
images whose hashes differ in at most ``threshold`` bits are the same picture up to resizing,
re-encoding or small intensity changes. On the shared MRI set, pairs with different labels (which are
not duplicates) start at 32 bits, so the default threshold of 24 keeps a margin; the 64-bit hash
is too coarse for MRI slices, which all look alike at 8×8.

The audit also draws a validation split from Training that keeps every group of near duplicates on
one side, and lists the Testing images with no near duplicate in Training (the leak-free subset).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from braintumor.config import LABELS
from braintumor.preprocessing import InvalidImageError, load_image, to_grey
from braintumor_training.dataset import TEST_SPLIT, TRAIN_SPLIT, ImageRecord, scan_dataset

#: Side of the perceptual hash grid: 16 gives 256-bit hashes.
HASH_SIZE = 16
#: Default largest Hamming distance (of 256 bits) between perceptual hashes of near duplicates.
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 24

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass
class ImageFacts:
    """What the audit reads from one file.

    Args:
        record: the image.
        error: why it could not be read, or ``None``.
        size: ``(width, height)`` in pixels.
        mode: the Pillow mode (``L``, ``RGB``, …).
        pixel_sha256: hash of the decoded grey pixels (equal for exact duplicates).
        phash: the perceptual hash, as packed bytes.
    """

    record: ImageRecord
    error: str | None = None
    size: tuple[int, int] = (0, 0)
    mode: str = ""
    pixel_sha256: str = ""
    phash: bytes = b""


@dataclass
class AuditReport:
    """The audit's findings, serialisable to JSON with :meth:`to_dict`."""

    data_dir: str
    threshold: int
    n_images: int
    class_counts: dict[str, dict[str, int]]
    sizes: dict[str, int]
    modes: dict[str, int]
    unreadable: list[dict[str, str]]
    exact_duplicate_groups: list[list[str]]
    near_duplicate_pairs: list[dict[str, Any]]
    summary: dict[str, int]
    leak_free_test: list[str]
    split: dict[str, list[str]] = field(default_factory=dict)
    external: list[dict[str, Any]] = field(default_factory=list)
    sequences: dict[str, Any] = field(default_factory=dict)
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-serialisable data."""
        return dict(self.__dict__)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``audit.json`` and the readable ``audit.md`` into ``out_dir``.

        With a sequence audit (:func:`audit_sequences`), also ``sequences.csv``: each image's estimated
        sequence and its probabilities.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / "audit.json", out_dir / "audit.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=1))
        md_path.write_text(render_summary(self))
        if self.sequences.get("images"):
            write_sequence_csv(self.sequences["images"], out_dir / "sequences.csv")
        return json_path, md_path


def perceptual_hash(source: Path | Image.Image) -> np.ndarray:
    """The 256-bit perceptual hash of an image (a path or a grey Pillow image), as 32 packed bytes."""
    grey = source if isinstance(source, Image.Image) else to_grey(load_image(source))
    return np.packbits(imagehash.phash(grey, hash_size=HASH_SIZE).hash.flatten())


def _inspect(data_dir: Path, record: ImageRecord) -> ImageFacts:
    facts = ImageFacts(record)
    try:
        image = load_image(data_dir / record.path)
        facts.size, facts.mode = image.size, image.mode
        grey = to_grey(image)
        facts.pixel_sha256 = hashlib.sha256(grey.tobytes()).hexdigest()
        facts.phash = perceptual_hash(grey).tobytes()
    except (InvalidImageError, OSError, Image.DecompressionBombError) as err:
        facts.error = str(err)
    return facts


def hamming_pairs(hashes: np.ndarray, threshold: int, block: int = 256) -> list[tuple[int, int, int]]:
    """All index pairs ``i < j`` whose hashes differ in at most ``threshold`` bits.

    Args:
        hashes: ``uint8`` array ``(n, bytes)`` of packed hash bits.
        threshold: largest Hamming distance kept.
        block: rows compared at once (bounds memory to ``block × n × bytes``).

    Returns:
        ``(i, j, distance)`` triples.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint8)
    n = len(hashes)
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, n, block):
        rows = hashes[start : start + block]
        dist = _POPCOUNT[rows[:, None, :] ^ hashes[None, :, :]].sum(axis=2, dtype=np.int32)
        ii, jj = np.nonzero(dist <= threshold)
        for i, j in zip(ii + start, jj, strict=True):
            if i < j:
                pairs.append((int(i), int(j), int(dist[i - start, j])))
    return pairs


def duplicate_groups(n: int, pairs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Connected components of the near-duplicate graph: one group id per image."""
    if not pairs:
        return np.arange(n)
    ii = np.array([p[0] for p in pairs])
    jj = np.array([p[1] for p in pairs])
    graph = coo_matrix((np.ones(len(pairs)), (ii, jj)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    return group


def split_training(
    records: Sequence[ImageRecord],
    groups: np.ndarray,
    val_fraction: float,
    seed: int,
) -> tuple[list[int], list[int]]:
    """Stratified, seeded train/validation split that keeps each near-duplicate group on one side.

    Args:
        records: the Training images.
        groups: near-duplicate group id of each record.
        val_fraction: share of images for validation (0 < f < 0.5).
        seed: seed of the split.

    Returns:
        ``(train_indices, val_indices)`` into ``records``.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    n_splits = max(2, round(1.0 / val_fraction))
    labels = np.array([r.label_index for r in records])
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(records)), labels, groups))
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


def audit_dataset(
    data_dir: Path,
    threshold: int = DEFAULT_NEAR_DUPLICATE_THRESHOLD,
    val_fraction: float = 0.1,
    seed: int = 42,
    workers: int = 4,
) -> AuditReport:
    """Audit a folder-per-class dataset and draw a leak-free validation split.

    Args:
        data_dir: dataset root holding ``Training/`` and ``Testing/``.
        threshold: near-duplicate Hamming distance (of 64 bits).
        val_fraction: share of Training images held out for validation.
        seed: seed of the validation split.
        workers: threads decoding images.
    """
    data_dir = Path(data_dir)
    records = scan_dataset(data_dir)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        facts = list(pool.map(lambda r: _inspect(data_dir, r), records))

    unreadable = [{"path": f.record.path, "error": f.error or ""} for f in facts if f.error]
    good = [f for f in facts if not f.error]

    class_counts: dict[str, dict[str, int]] = {}
    for f in good:
        per_split = class_counts.setdefault(f.record.split, {label: 0 for label in LABELS})
        per_split[f.record.label] += 1
    sizes = Counter(f"{w}x{h}" for f in good for (w, h) in [f.size])
    modes = Counter(f.mode for f in good)

    by_pixels: dict[str, list[str]] = {}
    for f in good:
        by_pixels.setdefault(f.pixel_sha256, []).append(f.record.path)
    exact_groups = sorted(sorted(paths) for paths in by_pixels.values() if len(paths) > 1)

    hashes = np.array([np.frombuffer(f.phash, dtype=np.uint8) for f in good]).reshape(len(good), -1)
    pairs = hamming_pairs(hashes, threshold)
    near_pairs: list[dict[str, Any]] = []
    summary = Counter()
    has_train_twin = np.zeros(len(good), dtype=bool)
    for i, j, dist in pairs:
        a, b = good[i].record, good[j].record
        kind = "within_" + a.split if a.split == b.split else "across_splits"
        summary[f"near_duplicate_pairs_{kind}"] += 1
        if a.label != b.label:
            summary["near_duplicate_pairs_with_different_labels"] += 1
        near_pairs.append({"a": a.path, "b": b.path, "distance": dist, "kind": kind, "same_label": a.label == b.label})
        if kind == "across_splits":
            has_train_twin[j if b.split == TEST_SPLIT else i] = True

    test_idx = [k for k, f in enumerate(good) if f.record.split == TEST_SPLIT]
    leak_free = [good[k].record.path for k in test_idx if not has_train_twin[k]]

    train_facts = [k for k, f in enumerate(good) if f.record.split == TRAIN_SPLIT]
    position = {k: n for n, k in enumerate(train_facts)}
    train_pairs = [(position[i], position[j], d) for i, j, d in pairs if i in position and j in position]
    groups = duplicate_groups(len(train_facts), train_pairs)
    train_records = [good[k].record for k in train_facts]
    tr, va = split_training(train_records, groups, val_fraction, seed)

    summary.update(
        {
            "images": len(facts),
            "unreadable": len(unreadable),
            "exact_duplicate_groups": len(exact_groups),
            "exact_duplicate_images": sum(len(g) for g in exact_groups),
            "test_images": len(test_idx),
            "test_images_with_near_duplicate_in_training": len(test_idx) - len(leak_free),
            "leak_free_test_images": len(leak_free),
            "train_images": len(tr),
            "val_images": len(va),
        }
    )
    return AuditReport(
        data_dir=str(data_dir.resolve()),
        threshold=threshold,
        n_images=len(facts),
        class_counts=class_counts,
        sizes=dict(sizes.most_common()),
        modes=dict(modes.most_common()),
        unreadable=unreadable,
        exact_duplicate_groups=exact_groups,
        near_duplicate_pairs=near_pairs,
        summary=dict(summary),
        leak_free_test=leak_free,
        split={"train": [train_records[k].path for k in tr], "val": [train_records[k].path for k in va]},
    )


def render_summary(report: AuditReport) -> str:
    """The readable Markdown summary of an audit."""
    s = report.summary
    lines = [
        "# Dataset audit",
        "",
        *([f"Command: `{report.command}`  "] if report.command else []),
        f"Dataset: `{report.data_dir}`  ",
        f"Near duplicates: perceptual hash (pHash, 16×16 = 256 bits) at Hamming distance ≤ {report.threshold}.",
        "",
        "## Class counts",
        "",
        "| split | " + " | ".join(LABELS) + " | total |",
        "|---|" + "---:|" * (len(LABELS) + 1),
    ]
    for split, counts in report.class_counts.items():
        row = [str(counts.get(label, 0)) for label in LABELS]
        lines.append(f"| {split} | " + " | ".join(row) + f" | {sum(counts.values())} |")
    lines += [
        "",
        "## Files",
        "",
        f"- images: {s.get('images', 0)}, unreadable: {s.get('unreadable', 0)}",
        "- sizes: " + ", ".join(f"{k} ({v})" for k, v in report.sizes.items()),
        "- modes: " + ", ".join(f"{k} ({v})" for k, v in report.modes.items()),
        "",
        "## Duplicates",
        "",
        f"- exact duplicate groups (identical pixels): {s.get('exact_duplicate_groups', 0)}"
        f" covering {s.get('exact_duplicate_images', 0)} images",
        f"- near-duplicate pairs within Training: {s.get('near_duplicate_pairs_within_Training', 0)}",
        f"- near-duplicate pairs within Testing: {s.get('near_duplicate_pairs_within_Testing', 0)}",
        f"- near-duplicate pairs across Training and Testing: {s.get('near_duplicate_pairs_across_splits', 0)}",
        f"- near-duplicate pairs whose labels differ: {s.get('near_duplicate_pairs_with_different_labels', 0)}",
        f"- Testing images with a near duplicate in Training: "
        f"{s.get('test_images_with_near_duplicate_in_training', 0)} of {s.get('test_images', 0)}",
        f"- leak-free Testing subset: {s.get('leak_free_test_images', 0)} images",
        "",
        "## Validation split",
        "",
        f"{s.get('train_images', 0)} training and {s.get('val_images', 0)} validation images, stratified by"
        " class; every near-duplicate group stays on one side, so no validation image has a near"
        " duplicate in the training part.",
    ]
    if report.unreadable:
        lines += ["", "## Unreadable files", ""]
        lines += [f"- `{u['path']}`: {u['error']}" for u in report.unreadable]
    if report.external or report.sequences:
        lines += ["", *render_sequences(report)]
    return "\n".join(lines) + "\n"


def write_sequence_csv(images: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write each image's estimated sequence (rows of :func:`audit_sequences`' ``images``) as CSV."""
    import csv

    columns = list(images[0]) if images else ["path"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(images)
    return path


def manifest_tables(records: Sequence[Any], estimated: dict[str, str] | None = None) -> dict[str, Any]:
    """Findings against sources and sequences of a manifest dataset.

    Args:
        records: its :class:`~braintumor_training.external.ManifestRecord` rows.
        estimated: ``{path: estimated sequence}`` for rows whose sequence is ``unknown``.

    Returns:
        ``{"n_images", "finding_by_source", "finding_by_sequence", "finding_by_estimated_sequence"}``, each
        table ``{finding: {column: n}}``; the last only for the rows ``estimated`` names, by source.
    """
    from braintumor_training.sequences import count_table

    findings = [r.finding for r in records]
    tables: dict[str, Any] = {
        "n_images": len(records),
        "finding_by_source": count_table(findings, [r.source for r in records]),
        "finding_by_sequence": count_table(findings, [r.sequence for r in records]),
    }
    if estimated:
        guessed = [r for r in records if r.path in estimated]
        by_source: dict[str, Any] = {}
        for source in sorted({r.source for r in guessed}):
            rows = [r for r in guessed if r.source == source]
            by_source[source] = count_table([r.finding for r in rows], [estimated[r.path] for r in rows])
        tables["finding_by_estimated_sequence"] = by_source
    return tables


def bias_summary(table: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The figures behind the audit's plain sentence on sequence bias, from a class × sequence table.

    Returns:
        ``{"tumor", "tumor_t1c", "tumor_t1c_share", "tumor_t1_weighted", "tumor_t1_weighted_share", "t2",
        "t2_notumor", "t2_notumor_share", "notumor", "notumor_t2", "notumor_t2_share"}`` (tumour = every class
        but ``notumor``; T1-weighted = T1 or T1C).
    """
    notumor = LABELS[2]
    tumor = {c: row for c, row in table.items() if c != notumor}
    n_tumor = sum(sum(row.values()) for row in tumor.values())
    n_tumor_t1c = sum(row.get("T1C", 0) for row in tumor.values())
    n_tumor_t1 = sum(row.get("T1", 0) for row in tumor.values()) + n_tumor_t1c
    n_t2 = sum(row.get("T2", 0) for row in table.values())
    n_t2_notumor = table.get(notumor, {}).get("T2", 0)
    n_notumor = sum(table.get(notumor, {}).values())
    return {
        "tumor": n_tumor,
        "tumor_t1c": n_tumor_t1c,
        "tumor_t1c_share": n_tumor_t1c / n_tumor if n_tumor else 0.0,
        "tumor_t1_weighted": n_tumor_t1,
        "tumor_t1_weighted_share": n_tumor_t1 / n_tumor if n_tumor else 0.0,
        "t2": n_t2,
        "t2_notumor": n_t2_notumor,
        "t2_notumor_share": n_t2_notumor / n_t2 if n_t2 else 0.0,
        "notumor": n_notumor,
        "notumor_t2": n_t2_notumor,
        "notumor_t2_share": n_t2_notumor / n_notumor if n_notumor else 0.0,
    }


def audit_sequences(
    report: AuditReport,
    external: Sequence[Path],
    hand_check: Path | None = None,
    min_confidence: float | None = None,
    seed: int = 42,
    folds: int = 5,
    workers: int = 2,
) -> AuditReport:
    """Add classes against sources and sequences to an audit: of manifest datasets, and estimated for the folder.

    A :class:`~braintumor_training.sequences.SequenceClassifier` is fitted on the manifests' labelled
    sequences and cross-validated with near-duplicate groups kept in one fold; it then estimates the
    sequence of every readable image of the audited folder dataset (and of the manifests' ``unknown``
    rows), and is compared with a hand check where one is given.

    Args:
        report: an :func:`audit_dataset` report (filled in place and returned).
        external: manifest dataset folders (``mri-external``).
        hand_check: CSV of hand labels (``path,sequence``, paths relative to the folder dataset).
        min_confidence: smallest top probability of a definite estimate (default: the classifier's).
        seed: seed of the classifier and of its folds.
        folds: cross-validation folds.
        workers: decoding threads.
    """
    from braintumor_training.external import read_manifest
    from braintumor_training.sequences import (
        DEFAULT_MIN_CONFIDENCE,
        FEATURE_PREPROCESSING,
        LEARNED_SEQUENCES,
        UNCERTAIN,
        SequenceClassifier,
        agreement,
        count_table,
        cross_validate,
        decide,
        features_of,
        hand_check_samples,
        labelled_slices,
        read_hand_labels,
    )

    threshold = DEFAULT_MIN_CONFIDENCE if min_confidence is None else min_confidence
    manifests = [(Path(root), read_manifest(Path(root), check_images=False)) for root in external]
    records = [r for _, rs in manifests for r in rs]
    labelled = labelled_slices(records, threshold=report.threshold, workers=workers)
    if len(set(labelled.sequences)) < 2:
        raise ValueError(f"the manifests label fewer than two of the sequences {', '.join(LEARNED_SEQUENCES)}")
    classifier = SequenceClassifier(threshold, seed).fit(labelled.features, labelled.sequences)
    validation = cross_validate(labelled.features, labelled.sequences, labelled.groups, folds, seed, threshold)

    unknown = [r for r in records if r.sequence not in LEARNED_SEQUENCES]
    unknown_estimates = classifier.predict(features_of([r.path for r in unknown], workers))
    estimated_external = dict(zip([r.path for r in unknown], unknown_estimates, strict=True))
    report.external = [
        {"name": root.name, "root": str(root.resolve()), **manifest_tables(rs, estimated_external)}
        for root, rs in manifests
    ]

    data_dir = Path(report.data_dir)
    unreadable = {u["path"] for u in report.unreadable}
    folder = [r for r in scan_dataset(data_dir) if r.path not in unreadable]
    probabilities = classifier.predict_proba(features_of([data_dir / r.path for r in folder], workers))
    estimates = decide(probabilities, classifier.classes, threshold)
    images = [
        {
            "path": r.path,
            "split": r.split,
            "label": r.label,
            "sequence": guess,
            **{f"p_{c}": round(float(p), 3) for c, p in zip(classifier.classes, row, strict=True)},
        }
        for r, guess, row in zip(folder, estimates, probabilities, strict=True)
    ]
    by_split = {
        split: count_table(
            [r.label for r in folder if r.split == split],
            [e for r, e in zip(folder, estimates, strict=True) if r.split == split],
        )
        for split in (TRAIN_SPLIT, TEST_SPLIT)
    }
    everything = count_table([r.label for r in folder], estimates)
    sequences: dict[str, Any] = {
        "classifier": {
            "features": "slice_features on " + FEATURE_PREPROCESSING.to_json(),
            "model": "HistGradientBoostingClassifier (seeded)",
            "trained_on": count_table(labelled.sources, labelled.sequences),
            "near_duplicate_groups": len(np.unique(labelled.groups)),
            "min_confidence": threshold,
            "cross_validation": validation,
        },
        "columns": [*classifier.classes, UNCERTAIN],
        "by_split": by_split,
        "all": everything,
        "bias": bias_summary(everything),
        "images": images,
    }
    if hand_check is not None:
        hand = read_hand_labels(Path(hand_check))
        guessed = {image["path"]: image["sequence"] for image in images}
        check = {"file": str(hand_check), **agreement(hand, guessed)}
        check["by_class"] = count_table([p.split("/")[1] for p in hand], list(hand.values()))
        check["samples"] = {
            name: agreement(read_hand_labels(Path(hand_check), name), guessed)
            for name in hand_check_samples(Path(hand_check))
        }
        sequences["hand_check"] = check
    report.sequences = sequences
    return report


def _markdown_table(
    table: dict[str, dict[str, int]], columns: Sequence[str], first: str, rows: Sequence[str] | None = None
) -> list[str]:
    """A Markdown table of counts ``{row: {column: n}}`` with a total column and a total row."""
    rows = [r for r in (rows or sorted(table)) if r in table]
    lines = [f"| {first} | " + " | ".join(columns) + " | total |", "|---|" + "---:|" * (len(columns) + 1)]
    for row in rows:
        counts = [table[row].get(c, 0) for c in columns]
        lines.append(f"| {row} | " + " | ".join(str(n) for n in counts) + f" | {sum(table[row].values())} |")
    totals = [sum(table[r].get(c, 0) for r in rows) for c in columns]
    lines.append("| total | " + " | ".join(str(n) for n in totals) + f" | {sum(totals)} |")
    return lines


def _columns(table: dict[str, dict[str, int]], order: Sequence[str] = ()) -> list[str]:
    seen = {c for row in table.values() for c in row}
    return [c for c in order if c in seen] + sorted(seen - set(order))


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.0f} %)" if whole else f"{part} of 0"


def render_sequences(report: AuditReport) -> list[str]:
    """The Markdown of classes against sources and sequences (:func:`audit_sequences`)."""
    from braintumor_training.external import FINDINGS, SEQUENCES
    from braintumor_training.sequences import HAND_SEQUENCES, LEARNED_SEQUENCES, UNCERTAIN

    lines = ["## Classes, sources and sequences", ""]
    for dataset in report.external:
        lines += [
            f"### {dataset['name']} (manifest dataset, {dataset['n_images']} images)",
            "",
            f"`{dataset['root']}`",
            "",
            "Finding × source:",
            "",
            *_markdown_table(dataset["finding_by_source"], _columns(dataset["finding_by_source"]), "finding", FINDINGS),
            "",
            "Finding × sequence (as labelled by the source):",
            "",
            *_markdown_table(
                dataset["finding_by_sequence"], _columns(dataset["finding_by_sequence"], SEQUENCES), "finding", FINDINGS
            ),
            "",
        ]
        for source, table in dataset.get("finding_by_estimated_sequence", {}).items():
            lines += [
                f"Estimated sequence of the `{source}` images, whose sequence is not labelled (see the classifier"
                " below):",
                "",
                *_markdown_table(table, [*LEARNED_SEQUENCES, UNCERTAIN], "finding", FINDINGS),
                "",
            ]
    seq = report.sequences
    if not seq:
        return lines
    name = Path(report.data_dir).name
    clf, columns = seq["classifier"], seq["columns"]
    cv = clf["cross_validation"]
    trained = clf["trained_on"]
    lines += [
        f"### {name}: estimated sequences",
        "",
        f"`{name}` does not label sequences: they are estimated by a small classifier (gradient boosting on"
        f" about a hundred intensity features of the head-cropped, stretched 160 × 160 slice; no network),"
        " trained on the labelled slices of the manifest datasets:",
        "",
        *_markdown_table(trained, _columns(trained, LEARNED_SEQUENCES), "source"),
        "",
        f"Cross-validated with {cv['folds']} folds that keep each group of near duplicates in one fold"
        f" ({clf['near_duplicate_groups']} groups): accuracy {cv['accuracy']:.3f}.",
        "",
        "| sequence | slices | accuracy |",
        "|---|---:|---:|",
        *[f"| {s} | {v['n']} | {v['accuracy']:.3f} |" for s, v in cv["per_sequence"].items()],
        "",
        f"An estimate whose top probability is below {clf['min_confidence']} is counted as `{UNCERTAIN}`"
        f" ({100 * (1 - cv['confident_share']):.1f} % of the cross-validated slices).",
        "",
    ]
    for split, table in seq["by_split"].items():
        lines += [f"Class × estimated sequence, {split}:", "", *_markdown_table(table, columns, "class", LABELS), ""]
    lines += ["Class × estimated sequence, both splits:", "", *_markdown_table(seq["all"], columns, "class", LABELS)]
    bias = seq["bias"]
    n_all = sum(sum(row.values()) for row in seq["all"].values())
    skewed = n_all and bias["t2"] and bias["t2_notumor_share"] > 1.5 * bias["notumor"] / n_all
    lines += [
        "",
        f"**Bias.** {_share(bias['tumor_t1c'], bias['tumor'])} tumour slices (glioma, meningioma, pituitary) are"
        f" estimated T1C ({bias.get('tumor_t1_weighted', 0)} T1 or T1C), and"
        f" {_share(bias['t2_notumor'], bias['t2'])} slices estimated T2 are `notumor`"
        f" ({_share(bias['notumor_t2'], bias['notumor'])} `notumor` slices are T2; `notumor` is"
        f" {_share(bias['notumor'], n_all)} slices in all). "
        + (
            "The sequence alone predicts much of the class: a model trained on this dataset can learn that"
            " bright fluid means no tumour, and will miss tumours on T2 and FLAIR slices."
            if skewed
            else "The estimated T2 slices are not markedly more often `notumor` than the dataset as a whole."
        ),
        "",
        "The classifier learns only the sequences labelled in the manifest datasets"
        f" ({', '.join(_columns(trained, LEARNED_SEQUENCES))}); a slice of another sequence (FLAIR above all) is"
        " counted as the labelled sequence it resembles most.",
    ]
    check = seq.get("hand_check")
    if check:
        by_eye = check["by_class"]
        tumor_rows = [row for c, row in by_eye.items() if c != LABELS[2]]
        n_tumor = sum(sum(row.values()) for row in tumor_rows)
        notumor = by_eye.get(LABELS[2], {})
        lines += [
            "",
            f"By eye (hand check): {_share(sum(row.get('T1C', 0) for row in tumor_rows), n_tumor)} tumour slices"
            f" are T1C and {sum(row.get('T2', 0) + row.get('FLAIR', 0) for row in tumor_rows)} T2 or FLAIR;"
            f" {_share(notumor.get('T2', 0) + notumor.get('FLAIR', 0), sum(notumor.values()))} `notumor` slices"
            f" are T2 or FLAIR ({notumor.get('T1C', 0)} T1C).",
        ]
        flair = check["confusion"].get("FLAIR", {})
        seen_t1c = check["confusion"].get("T1C", {})
        estimated = ", ".join(f"{k} {v}" for k, v in flair.items() if v)
        if flair:
            lines += [
                "",
                f"FLAIR slices in the hand check: {sum(flair.values())} of {check['n']}, estimated as: {estimated}.",
            ]
        if seen_t1c:
            lines += [
                "",
                f"Of the {sum(seen_t1c.values())} slices seen as T1C by eye, {seen_t1c.get('T1', 0)} were"
                f" estimated T1 and {seen_t1c.get('T2', 0)} T2: read the T1 and T1C columns together where"
                " they disagree.",
            ]
    check = seq.get("hand_check")
    if check:
        lines += [
            "",
            f"#### Hand check ({check['n']} images, `{check['file']}`)",
            "",
            "Hand label × estimate:",
            "",
            *_markdown_table(check["confusion"], [*LEARNED_SEQUENCES, UNCERTAIN], "by eye", HAND_SEQUENCES),
            "",
            f"Agreement on the images whose hand label the classifier can answer ({', '.join(LEARNED_SEQUENCES)}):"
            f" {_share(check['agree'], check['comparable'])}.",
        ]
        for sample, result in check.get("samples", {}).items():
            lines.append(
                f"- sample {sample}: {result['agree']} of {result['comparable']} ({100 * result['agreement']:.0f} %)"
            )
        lines += [
            "",
            "Class × sequence by eye:",
            "",
            *_markdown_table(check["by_class"], _columns(check["by_class"], HAND_SEQUENCES), "class", LABELS),
        ]
    return lines
