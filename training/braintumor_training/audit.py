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

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-serialisable data."""
        return dict(self.__dict__)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``audit.json`` and the readable ``audit.md`` into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / "audit.json", out_dir / "audit.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=1))
        md_path.write_text(render_summary(self))
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
    return "\n".join(lines) + "\n"
