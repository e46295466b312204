"""Datasets described by a manifest (``manifest.csv``): slices from other sources, with their sequences.

A manifest dataset (``../shared/data/mri-external``) is read in place. Each row names an image and what
is known of it: ``path`` (relative to the folder), ``source``, ``sequence`` (:data:`SEQUENCES`) and
``finding`` (:data:`FINDINGS`). ``glioma``, ``meningioma`` and ``notumor`` are the model's classes;
``other_tumor`` (a type outside the four classes) and ``tumor`` (type not given) say only that there is a
tumour, so training asks of them only a high tumour probability (see :func:`target_mask`).

The split keeps every group of near duplicates (neighbouring slices, reprocessed copies) on one side, as
the audit does for the folder dataset, and is seeded and stratified by source, sequence and finding.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from braintumor.config import LABELS, NO_TUMOR_INDEX
from braintumor_training.dataset import DatasetError

MANIFEST = "manifest.csv"
#: MRI sequences a manifest may name (``unknown`` where the source does not say).
SEQUENCES: tuple[str, ...] = ("T1", "T1C", "T2", "FLAIR", "unknown")
#: Findings a manifest may name: the model's classes, plus tumours of another or of an unstated type.
FINDINGS: tuple[str, ...] = (*LABELS, "other_tumor", "tumor")
#: Findings that say only "a tumour": trained and judged on the tumour probability, never on a type.
TUMOR_ONLY_FINDINGS: frozenset[str] = frozenset({"other_tumor", "tumor"})
#: Parts of a manifest dataset.
EXTERNAL_SPLITS: tuple[str, ...] = ("train", "val", "test")
_COLUMNS = ("path", "source", "sequence", "finding")


class ManifestError(DatasetError):
    """A manifest row cannot be used; the message names the row (line number and path)."""


@dataclass(frozen=True)
class ManifestRecord:
    """One image of a manifest dataset.

    Args:
        path: absolute path of the file.
        source: the source dataset it comes from.
        sequence: the MRI sequence (one of :data:`SEQUENCES`).
        finding: what the image shows (one of :data:`FINDINGS`).
        detail: the source's own finer label (tumour type), or ``""``.
        sequence_by_eye: a sequence read by eye where the manifest gives none (evaluation only; see
            :func:`with_sequences_by_eye`), or ``""``.
        group: its group of near duplicates in a run's split (evaluation only, for intervals that count
            groups as clusters), or ``None``.
    """

    path: str
    source: str
    sequence: str
    finding: str
    detail: str = ""
    sequence_by_eye: str = ""
    group: int | None = None

    @property
    def is_tumor(self) -> bool:
        """Whether the image shows a tumour."""
        return self.finding != LABELS[NO_TUMOR_INDEX]

    @property
    def label_index(self) -> int | None:
        """Index of the finding in :data:`~braintumor.config.LABELS`, or ``None`` for a tumour-only finding."""
        return LABELS.index(self.finding) if self.finding in LABELS else None

    @property
    def stratum(self) -> str:
        """What the split balances: source, sequence and finding."""
        return f"{self.source}/{self.sequence}/{self.finding}"


def with_sequences_by_eye(
    records: Sequence[ManifestRecord], labels: Mapping[str, str], root: Path
) -> list[ManifestRecord]:
    """``records`` with the sequence read by eye of each image that ``labels`` names.

    Evaluation reports these images by that sequence too (Br35H, for instance, names none, and about a
    quarter of it is FLAIR, which no manifest row labels); training never reads it. Only an image whose
    manifest sequence is ``unknown`` may be read by eye: a hand label never stands beside the source's.

    Args:
        records: every image of a manifest dataset.
        labels: ``{path relative to root: sequence}`` (a hand-check CSV read by
            :func:`~braintumor_training.sequences.read_hand_labels`).
        root: the manifest dataset's folder.

    Raises:
        ManifestError: when ``labels`` is empty, or names a path that is not an image of ``records`` or an
            image whose manifest names its sequence (the message names the path).
    """
    if not labels:
        raise ManifestError("it names no image")
    by_path = {str(Path(r.path).resolve()): r for r in records}
    read: dict[str, str] = {}
    for relative, sequence in labels.items():
        record = by_path.get(str((Path(root) / relative).resolve()))
        if record is None:
            raise ManifestError(f"{relative} is not an image of the manifest dataset in {root}")
        if record.sequence != "unknown":
            raise ManifestError(
                f"{relative}: its manifest already names its sequence ({record.sequence}); only an image of "
                "unknown sequence may be read by eye"
            )
        read[record.path] = sequence
    return [replace(r, sequence_by_eye=read.get(r.path, "")) for r in records]


def target_mask(finding: str) -> np.ndarray:
    """The classes a finding allows, as a float mask over :data:`~braintumor.config.LABELS`.

    A class label allows only itself (one-hot); a tumour-only finding allows every tumour class, so the
    loss ``-log Σ p(allowed)`` asks for ``1 − p(notumor)`` and never for a guessed type.
    """
    if finding in LABELS:
        mask = np.zeros(len(LABELS), np.float32)
        mask[LABELS.index(finding)] = 1.0
        return mask
    if finding in TUMOR_ONLY_FINDINGS:
        mask = np.ones(len(LABELS), np.float32)
        mask[NO_TUMOR_INDEX] = 0.0
        return mask
    raise ValueError(f"unknown finding {finding!r}; expected one of {', '.join(FINDINGS)}")


def _check_readable(path: Path) -> str | None:
    from braintumor.preprocessing import InvalidImageError, load_image

    try:
        load_image(path)
    except (InvalidImageError, OSError) as err:
        return str(err)
    return None


def read_manifest(root: Path, check_images: bool = True, workers: int = 4) -> list[ManifestRecord]:
    """Read and check ``root/manifest.csv``.

    Args:
        root: the dataset folder.
        check_images: decode every image, so that an unreadable file stops a run before it starts.
        workers: decoding threads.

    Raises:
        ManifestError: naming the first bad row (missing or unreadable file, unknown finding or sequence,
            missing column), with its line number.
    """
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise ManifestError(f"no {MANIFEST} in {root}")
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{manifest}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    records: list[ManifestRecord] = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest} line {line} ({row.get('path') or '?'})"
        if row["finding"] not in FINDINGS:
            raise ManifestError(f"{where}: unknown finding {row['finding']!r}; expected one of {', '.join(FINDINGS)}")
        if row["sequence"] not in SEQUENCES:
            raise ManifestError(
                f"{where}: unknown sequence {row['sequence']!r}; expected one of {', '.join(SEQUENCES)}"
            )
        path = (root / row["path"]).resolve()
        if not row["path"] or not path.is_file():
            raise ManifestError(f"{where}: file not found")
        records.append(
            ManifestRecord(str(path), row["source"], row["sequence"], row["finding"], row.get("detail") or "")
        )
    if not records:
        raise ManifestError(f"{manifest} lists no images")
    if check_images:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = list(pool.map(lambda r: _check_readable(Path(r.path)), records))
        for line, (record, error) in enumerate(zip(records, errors, strict=True), start=2):
            if error:
                name = Path(record.path).relative_to(root)
                raise ManifestError(f"{manifest} line {line} ({name}): unreadable: {error}")
    return records


def split_groups(
    strata: Sequence[str],
    groups: np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 42,
) -> list[str]:
    """Assign each image to ``train``, ``val`` or ``test``, keeping each group of near duplicates together.

    Args:
        strata: what each image's split should balance (see :attr:`ManifestRecord.stratum`).
        groups: near-duplicate group id of each image.
        fractions: shares of train, validation and test (summing to 1).
        seed: seed of the split.

    Returns:
        The part of each image, in order.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    strata_codes = np.unique(np.asarray(strata), return_inverse=True)[1]
    n = len(strata_codes)
    part = np.array(["train"] * n, dtype=object)

    def folds(share: float, codes: np.ndarray) -> int:
        # StratifiedGroupKFold with k folds holds out about 1/k in one fold; a tiny set caps k
        return max(2, min(round(1.0 / share), int(np.bincount(codes).max())))

    splitter = StratifiedGroupKFold(n_splits=folds(fractions[2], strata_codes), shuffle=True, random_state=seed)
    rest, test = next(splitter.split(np.zeros(n), strata_codes, groups))
    part[test] = "test"
    val_share = fractions[1] / (1.0 - fractions[2])
    splitter = StratifiedGroupKFold(n_splits=folds(val_share, strata_codes[rest]), shuffle=True, random_state=seed + 1)
    _, val = next(splitter.split(np.zeros(len(rest)), strata_codes[rest], groups[rest]))
    part[rest[val]] = "val"
    return part.tolist()


def external_split(
    records: Sequence[ManifestRecord],
    threshold: int,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int = 4,
    training_images: Sequence[Path] = (),
) -> dict[str, Any]:
    """Group a manifest dataset's near duplicates (the audit's perceptual hash) and split it by group.

    Args:
        records: the manifest dataset.
        threshold: near-duplicate Hamming distance (of 256 bits).
        seed: seed of the split.
        fractions: shares of train, validation and test.
        workers: hashing threads.
        training_images: the other training images of the run: a group with a near duplicate among them
            goes to ``train``, so that neither validation nor test holds a copy of a training image.

    Returns:
        ``{"parts": {path: part}, "groups": {path: group id}, "counts": {part: {stratum: n}},
        "n_groups": int, "near_other_training": int, ...}``, paths absolute.
    """
    from braintumor_training.audit import duplicate_groups, hamming_pairs, perceptual_hash

    paths = [Path(r.path) for r in records] + [Path(p) for p in training_images]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = np.array(list(pool.map(perceptual_hash, paths)))
    n = len(records)
    pairs = hamming_pairs(hashes, threshold)
    groups = duplicate_groups(n, [p for p in pairs if p[1] < n])
    near_other = {i for i, j, _ in pairs if i < n <= j}
    parts = np.array(split_groups([r.stratum for r in records], groups, fractions, seed), dtype=object)
    tied = np.isin(groups, groups[sorted(near_other)]) if near_other else np.zeros(n, bool)
    parts[tied] = "train"
    parts = parts.tolist()
    counts: dict[str, Counter] = {p: Counter() for p in EXTERNAL_SPLITS}
    for record, part in zip(records, parts, strict=True):
        counts[part][record.stratum] += 1
    return {
        "parts": {r.path: p for r, p in zip(records, parts, strict=True)},
        "groups": {r.path: int(g) for r, g in zip(records, groups, strict=True)},
        "counts": {p: dict(sorted(c.items())) for p, c in counts.items()},
        "n_groups": len(np.unique(groups)),
        "near_other_training": int(tied.sum()),
        "threshold": threshold,
        "seed": seed,
        "fractions": list(fractions),
    }
