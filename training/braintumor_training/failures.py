"""The external images a model gets wrong as a screen: each missed tumour and false alarm, and their groups.

A subgroup table says how often; this says which. Each missed tumour slice (tumour probability below the
threshold) and each false alarm (a normal slice at or above it) of a manifest dataset's test part is listed
with what is known of it and its group of near duplicates (``ManifestRecord.group``, from the run's
``external_split.json``: images near-identical by perceptual hash, such as reprocessed copies and neighbouring
slices that look alike), so that a reader sees that four missed slices may be one missed lesion, and a contact
sheet shows them. Slices of one case that look different fall in different groups, so groups are not cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.config import NO_TUMOR_INDEX
from braintumor_training.subgroups import TUMOR_THRESHOLD

#: The two ways a slice is got wrong as a screen, in report order.
KINDS: tuple[str, ...] = ("missed tumour", "false alarm")


def failure_rows(
    probabilities: np.ndarray,
    records: Sequence[Any],
    tumor_threshold: float = TUMOR_THRESHOLD,
    root: Path | None = None,
) -> list[dict[str, Any]]:
    """Each missed tumour and false alarm: missed tumours first, lowest tumour probability first, then false
    alarms, highest first (ties in the order of ``records``).

    Args:
        probabilities: ``(n, classes)`` calibrated probabilities, in the order of ``records``.
        records: :class:`~braintumor_training.external.ManifestRecord` of the set, each with its ``group``.
        tumor_threshold: a tumour is called when ``1 − p(notumor) ≥ tumor_threshold``.
        root: paths are given relative to it (the manifest dataset's folder); as in ``records`` when ``None``.

    Returns:
        Rows with ``kind``, ``path``, ``source``, ``sequence``, ``sequence_by_eye``, ``finding``,
        ``detail``, ``group`` and ``tumor_probability``.

    Raises:
        ValueError: when the counts differ, or an image of ``records`` has no group.
    """
    tumour = 1.0 - np.asarray(probabilities)[:, NO_TUMOR_INDEX]
    if len(tumour) != len(records):
        raise ValueError(f"{len(tumour)} probabilities for {len(records)} records")
    ungrouped = [r.path for r in records if r.group is None]
    if ungrouped:
        raise ValueError(f"{len(ungrouped)} images have no group of near duplicates (first: {ungrouped[0]})")
    rows = []
    for record, p in zip(records, tumour, strict=True):
        called = bool(p >= tumor_threshold)
        if called == record.is_tumor:
            continue
        rows.append(
            {
                "kind": KINDS[0] if record.is_tumor else KINDS[1],
                "path": str(Path(record.path).relative_to(root)) if root is not None else record.path,
                "source": record.source,
                "sequence": record.sequence,
                "sequence_by_eye": getattr(record, "sequence_by_eye", ""),
                "finding": record.finding,
                "detail": record.detail,
                "group": record.group,
                "tumor_probability": float(p),
            }
        )
    rows.sort(key=lambda r: (KINDS.index(r["kind"]), r["tumor_probability"] * (1 if r["kind"] == KINDS[0] else -1)))
    return rows


def failure_summary(rows: Sequence[Mapping[str, Any]], records: Sequence[Any]) -> str:
    """One sentence: how many slices of each kind, in how many groups, out of how many.

    Args:
        rows: :func:`failure_rows` of ``records``.
        records: the set, each with its ``group``.

    Returns:
        For instance "17 missed tumours of 818 tumour slices, in 14 of their 501 groups of near duplicates;
        10 false alarms of 79 normal slices, in 6 of their 67 groups of near duplicates."
    """
    parts = []
    for kind, is_tumor in zip(KINDS, (True, False), strict=True):
        of = [r for r in records if r.is_tumor == is_tumor]
        wrong = [r for r in rows if r["kind"] == kind]
        of_groups = {r.group for r in of}
        wrong_groups = {r["group"] for r in wrong}
        parts.append(
            f"{len(wrong)} {kind}{'' if len(wrong) == 1 else 's'} of {len(of)} "
            f"{'tumour' if is_tumor else 'normal'} slices, in {len(wrong_groups)} of their {len(of_groups)} "
            "groups of near duplicates"
        )
    return "; ".join(parts) + "."


def render_failures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A Markdown table of :func:`failure_rows`, numbered as on the contact sheet ("None." when empty).

    Args:
        rows: the rows.
    """
    if not rows:
        return ["None."]
    lines = [
        "| # | kind | source | sequence | finding (source's type) | group | tumour probability | image |",
        "|---:|---|---|---|---|---:|---:|---|",
    ]
    for k, row in enumerate(rows, 1):
        sequence = row["sequence"] + (f" ({row['sequence_by_eye']} by eye)" if row["sequence_by_eye"] else "")
        finding = row["finding"] + (f" ({row['detail']})" if row["detail"] and row["detail"] != "unknown" else "")
        lines.append(
            f"| {k} | {row['kind']} | {row['source']} | {sequence} | {finding} | {row['group']} "
            f"| {row['tumor_probability']:.3f} | `{row['path']}` |"
        )
    return lines


def failure_sheet(
    rows: Sequence[Mapping[str, Any]], out: Path, root: Path | None = None, columns: int = 6, tile: int = 200
) -> Path | None:
    """A numbered contact sheet of the rows' images (as :func:`render_failures` numbers them).

    With no rows it writes nothing, removes an earlier sheet at ``out`` and returns ``None``.

    Args:
        rows: :func:`failure_rows`.
        out: the PNG to write.
        root: the folder the rows' paths are relative to (``None``: as they are).
        columns: tiles per row.
        tile: side of a tile in pixels.
    """
    if not rows:
        Path(out).unlink(missing_ok=True)
        return None
    from braintumor_training.sequences import contact_sheet

    paths = [Path(root) / r["path"] if root is not None else Path(r["path"]) for r in rows]
    return contact_sheet(paths, out, columns=columns, tile=tile)
